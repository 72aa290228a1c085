"""segformer_fast._C's CPU dwconv_gelu op (Mix-FFN's depthwise 3x3 conv + bias + exact GELU, one pass) against
the plain-PyTorch implementation in fp64, its input checks, opcheck, and its baseline (non-AVX-512) loops."""

import json
import os
import subprocess
import sys

import pytest
import torch

from segformer_fast import ops, torch_ops
from segformer_fast.testing import assert_within_tolerance, tolerance

needs_kernel = pytest.mark.skipif(not ops._has_kernel("dwconv_gelu", torch.device("cpu")),
                                  reason="segformer_fast._C is not built (no CPU dwconv_gelu kernel)")

# (batch, H, W, C): stage grids of SegFormer (C = 4 x embed dim), odd sizes, channels that are no multiple of 16,
# and one-pixel rows and columns (every tap but the centre falls outside)
SHAPES = ((1, 16, 16, 128), (2, 7, 5, 19), (1, 1, 9, 40), (1, 6, 1, 33), (1, 1, 1, 16), (3, 4, 4, 1280))


def make_inputs(batch, height, width, channels, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, height * width, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(channels, 1, 3, 3, generator=generator, dtype=torch.float64) / 3
    bias = 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
    return tokens.to(dtype), weight.to(dtype), bias.to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dwconv_gelu_matches_fp64_reference(shape, dtype):
    batch, height, width, channels = shape
    tokens, weight, bias = make_inputs(*shape, dtype, seed=sum(shape))
    got = torch.ops.segformer_fast.dwconv_gelu(tokens, height, width, weight, bias)
    assert got.dtype == dtype and got.shape == tokens.shape and got.is_contiguous()
    reference = torch_ops.dwconv_gelu(tokens.double(), height, width, weight.double(), bias.double())
    eager = torch_ops.dwconv_gelu(tokens, height, width, weight, bias)
    assert_within_tolerance(got, reference, dtype, eager=eager)


@needs_kernel
def test_dwconv_gelu_through_ops_equals_the_kernel_and_the_eager_path_without_it(monkeypatch):
    tokens, weight, bias = make_inputs(2, 9, 11, 48, torch.float32, seed=3)
    kernel = torch.ops.segformer_fast.dwconv_gelu(tokens, 9, 11, weight, bias)
    assert torch.equal(ops.dwconv_gelu(tokens, 9, 11, weight, bias), kernel)
    monkeypatch.setitem(ops._KERNEL_DEVICES, "dwconv_gelu", frozenset())
    monkeypatch.setattr(ops, "_warned", True)
    assert torch.equal(ops.dwconv_gelu(tokens, 9, 11, weight, bias), torch_ops.dwconv_gelu(tokens, 9, 11, weight, bias))


@needs_kernel
def test_dwconv_gelu_propagates_nan_and_keeps_large_values():
    tokens, weight, bias = make_inputs(1, 5, 6, 32, torch.float32, seed=4)
    tokens[0, 14, 7] = float("nan")  # pixel (2, 2), channel 7: its 3x3 neighbourhood turns NaN in channel 7 only
    tokens[0, 0, 3] = 1e4  # GELU(x) = x for large x, GELU(-x) = 0
    got = torch.ops.segformer_fast.dwconv_gelu(tokens, 5, 6, weight, bias)
    nan_at = got.isnan().nonzero().tolist()
    expected = sorted([0, y * 6 + x, 7] for y in (1, 2, 3) for x in (1, 2, 3))
    assert sorted(nan_at) == expected
    reference = torch_ops.dwconv_gelu(tokens.double(), 5, 6, weight.double(), bias.double())
    finite = ~reference.isnan()
    assert_within_tolerance(got[finite], reference[finite], torch.float32)


@needs_kernel
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, w, b: (t[0], w, b), "must be 3-D"),
        (lambda t, w, b: (t[:, :-1], w, b), "tokens but the grid is"),
        (lambda t, w, b: (t, w[:, :, :2], b), r"weight must have shape \(C, 1, 3, 3\)"),
        (lambda t, w, b: (t, w, b[:-1]), r"bias must have shape \(C,\)"),
        (lambda t, w, b: (t, w.double(), b), "dtype mismatch"),
        (lambda t, w, b: (t.to(torch.int32), w, b), "expected float32, float16 or bfloat16"),
        (lambda t, w, b: (t.transpose(1, 2).contiguous().transpose(1, 2), w, b), "must be contiguous"),
    ],
)
def test_dwconv_gelu_input_checks(change, message):
    tokens, weight, bias = change(*make_inputs(2, 4, 5, 24, torch.float32, seed=5))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.segformer_fast.dwconv_gelu(tokens, 4, 5, weight, bias)


@needs_kernel
def test_dwconv_gelu_opcheck():
    tokens, weight, bias = make_inputs(2, 4, 5, 24, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.segformer_fast.dwconv_gelu.default, (tokens, 4, 5, weight, bias))


@needs_kernel
def test_dwconv_gelu_baseline_loops_match_the_vectorized_ones(tmp_path):
    """SEGFORMER_FAST_CPU_BASELINE=1 (read once per process) runs the loops built for the baseline ISA: two fresh
    processes compute the same inputs, one each way; both agree with fp64, and on a CPU with AVX-512 their fp32
    outputs differ in the last bits (std::erf against the vectorized erf), which shows the switch took effect."""
    script = (
        "import json, sys, torch\n"
        "import segformer_fast.ops\n"
        "from segformer_fast import torch_ops\n"
        "from segformer_fast.testing import max_abs_error\n"
        "errors = {}\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    g = torch.Generator().manual_seed(7)\n"
        "    t = torch.randn(2, 35, 37, generator=g, dtype=torch.float64)\n"
        "    w = torch.randn(37, 1, 3, 3, generator=g, dtype=torch.float64) / 3\n"
        "    b = torch.randn(37, generator=g, dtype=torch.float64)\n"
        "    got = torch.ops.segformer_fast.dwconv_gelu(t.to(dtype), 5, 7, w.to(dtype), b.to(dtype))\n"
        "    ref = torch_ops.dwconv_gelu(t, 5, 7, w, b)\n"
        "    eager = torch_ops.dwconv_gelu(t.to(dtype), 5, 7, w.to(dtype), b.to(dtype))\n"
        "    errors[str(dtype)] = [max_abs_error(got, ref), max_abs_error(eager, ref), float(ref.abs().max())]\n"
        "    torch.save(got, f'{sys.argv[1]}-{str(dtype)}.pt')\n"
        "print(json.dumps(errors))\n"
    )
    results = {}
    for baseline in ("0", "1"):
        env = {**os.environ, "SEGFORMER_FAST_CPU_BASELINE": baseline}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / baseline)], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        results[baseline] = json.loads(done.stdout.strip().splitlines()[-1])
    for baseline, errors in results.items():
        for dtype_name, (error, eager_error, max_ref) in errors.items():
            allowed = tolerance(torch.tensor([max_ref]), getattr(torch, dtype_name.split(".")[1]), eager_error)
            assert error <= allowed, (baseline, dtype_name, error, allowed)
    vectorized, baseline = (torch.load(tmp_path / f"{name}-torch.float32.pt") for name in ("0", "1"))
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not torch.equal(vectorized, baseline)
