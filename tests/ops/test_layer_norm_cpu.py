"""segformer_fast._C's CPU layer_norm op (LayerNorm over the last dim with fp32 statistics) against F.layer_norm in
fp64 by the tolerance rule, its input checks, opcheck, its baseline (non-AVX-512) loops, and the engine's use of it
(extension.layer_norm, its fallback)."""

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.ops import extension as ops
from segformer_fast.ops import reference

from helpers import assert_baseline_loops_match_vectorized, assert_within_tolerance

needs_kernel = pytest.mark.skipif(not ops._has_kernel("layer_norm", torch.device("cpu")),
                                  reason="segformer_fast._C is not built (no CPU layer_norm kernel)")

# (leading dims..., C): SegFormer's channel counts (every stage of B0-B5 and the SR LayerNorm), channel counts with
# a masked tail (37, 7, 1, 520), a 2-D input and a 4-D input
SHAPES = ((1, 1024, 32), (2, 256, 64), (1, 64, 160), (3, 16, 256), (1, 9, 320), (2, 5, 512), (1, 33, 37),
          (4, 7), (2, 3, 1), (1, 11, 520), (2, 3, 4, 48))


def make_inputs(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[-1]
    # an offset and a spread per row, as residual-stream tokens have: the statistics must not cancel badly
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3
         + torch.randn(shape[:-1] + (1,), generator=generator, dtype=torch.float64) * 5)
    weight = torch.randn(channels, generator=generator, dtype=torch.float64)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def fp64_reference(x, weight, bias, eps):
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), eps)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_fp64(shape, dtype):
    x, weight, bias = make_inputs(shape, dtype, seed=sum(shape))
    got = torch.ops.segformer_fast.layer_norm(x, weight, bias, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    eager = reference.layer_norm(x, weight, bias, 1e-6)  # ATen's LayerNorm in the same dtype
    assert_within_tolerance(got, fp64_reference(x, weight, bias, 1e-6), dtype, eager=eager)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, channels, height, width",
                         [(1, 32, 16, 16), (2, 64, 7, 9), (3, 37, 5, 4), (1, 3, 2, 2)])
def test_layer_norm_reads_channel_major_tokens(batch, channels, height, width, dtype):
    """The NCHW patch-embed output as tokens (B, h*w, C), strides (C*h*w, 1, h*w): normalized without a copy
    (16-token tiles, ragged last tile), into contiguous rows equal to the kernel's result on the same rows."""
    features = make_inputs((batch, channels, height * width), dtype, seed=channels + height)[0]
    weight, bias = make_inputs((channels,), dtype, seed=1)[0], make_inputs((channels,), dtype, seed=2)[0]
    tokens = features.transpose(1, 2)
    assert ops._is_channel_major(tokens)
    got = torch.ops.segformer_fast.layer_norm(tokens, weight, bias, 1e-6)
    assert got.is_contiguous() and got.shape == tokens.shape
    assert_within_tolerance(got, fp64_reference(tokens, weight, bias, 1e-6), dtype,
                            eager=reference.layer_norm(tokens, weight, bias, 1e-6))
    rows = torch.ops.segformer_fast.layer_norm(tokens.contiguous(), weight, bias, 1e-6)
    assert_within_tolerance(got, rows.double(), dtype, eager=reference.layer_norm(tokens, weight, bias, 1e-6))


@needs_kernel
def test_layer_norm_eps_and_constant_rows():
    """A constant row has zero variance: the output is the bias exactly (eps keeps rstd finite)."""
    x = torch.full((3, 48), 2.5)
    weight, bias = torch.randn(48), torch.randn(48)
    got = torch.ops.segformer_fast.layer_norm(x, weight, bias, 1e-5)
    assert torch.equal(got, bias.expand(3, 48))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_nan_poisons_its_row_only(dtype):
    x, weight, bias = make_inputs((6, 40), dtype, seed=11)
    x[2, 17] = float("nan")
    got = torch.ops.segformer_fast.layer_norm(x, weight, bias, 1e-6)
    assert got[2].isnan().all()
    others = torch.tensor([r != 2 for r in range(6)])
    assert not got[others].isnan().any()
    assert_within_tolerance(got[others], fp64_reference(x[others], weight, bias, 1e-6), dtype,
                            eager=reference.layer_norm(x[others], weight, bias, 1e-6))


@needs_kernel
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, b: (x[0, 0, 0], w, b), "at least one dimension"),
        (lambda x, w, b: (x[..., :0], w[:0], b[:0]), "C >= 1"),
        (lambda x, w, b: (x.to(torch.int32), w, b), "expected a float32, float16 or bfloat16 x"),
        (lambda x, w, b: (x, w[:-1], b), r"weight must have shape \(C,\) = \(16,\)"),
        (lambda x, w, b: (x, w, b.view(4, 4)), r"bias must have shape \(C,\) = \(16,\)"),
        (lambda x, w, b: (x, w.double(), b), "dtype mismatch"),
        (lambda x, w, b: (x[:, ::2], w, b), r"must be contiguous, or \(B, N, C\) with strides"),
    ],
)
def test_layer_norm_input_checks(change, message):
    x, weight, bias = change(*make_inputs((2, 6, 16), torch.float32, seed=5))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.segformer_fast.layer_norm(x, weight, bias, 1e-6)


@needs_kernel
def test_layer_norm_opcheck():
    x, weight, bias = make_inputs((2, 10, 48), torch.float32, seed=6)
    torch.library.opcheck(torch.ops.segformer_fast.layer_norm.default, (x, weight, bias, 1e-6))


@needs_kernel
def test_layer_norm_wrapper_uses_the_kernel_and_falls_back(monkeypatch):
    """extension.layer_norm: the kernel on CPU (a strided input that is not channel-major made contiguous first),
    the reference without it."""
    x, weight, bias = make_inputs((2, 40, 48), torch.float32, seed=8)
    tokens = x[:, ::2]  # (2, 20, 48), rows 96 apart
    assert not tokens.is_contiguous() and not ops._is_channel_major(tokens)
    kernel = torch.ops.segformer_fast.layer_norm(tokens.contiguous(), weight, bias, 1e-6)
    assert torch.equal(ops.layer_norm(tokens, weight, bias, 1e-6), kernel)
    monkeypatch.setitem(ops._KERNEL_DEVICES, "layer_norm", frozenset())
    monkeypatch.setattr(ops, "_warned", True)
    fallback = ops.layer_norm(tokens, weight, bias, 1e-6)
    assert torch.equal(fallback, reference.layer_norm(tokens, weight, bias, 1e-6))
    assert_within_tolerance(kernel, fp64_reference(tokens, weight, bias, 1e-6), torch.float32, eager=fallback)


@needs_kernel
def test_layer_norm_baseline_loops_match_the_vectorized_ones(tmp_path):
    """SEGFORMER_FAST_CPU_BASELINE=1 (read once per process) runs the loops built for the baseline ISA: two fresh
    processes normalize the same rows, one each way; both agree with fp64, and on a CPU with AVX-512 their fp32
    outputs differ in the last bits (sequential sums against 16-lane sums), which shows the switch took effect."""
    script = (
        "import json, sys, torch, torch.nn.functional as F\n"
        "import segformer_fast.ops.extension\n"
        "from segformer_fast.ops import reference\n"
        "from segformer_fast.core.numerics import max_abs_error\n"
        "errors = {}\n"
        "g = torch.Generator().manual_seed(7)\n"
        "x = torch.randn(300, 203, generator=g, dtype=torch.float64) * 4 + 3\n"
        "w = torch.randn(203, generator=g, dtype=torch.float64)\n"
        "b = torch.randn(203, generator=g, dtype=torch.float64)\n"
        "ref = F.layer_norm(x, (203,), w, b, 1e-6)\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    args = (x.to(dtype), w.to(dtype), b.to(dtype))\n"
        "    got = torch.ops.segformer_fast.layer_norm(*args, 1e-6)\n"
        "    eager = reference.layer_norm(*args, 1e-6)\n"
        "    errors[str(dtype)] = [max_abs_error(got, ref), max_abs_error(eager, ref), float(ref.abs().max())]\n"
        "    torch.save(got, f'{sys.argv[1]}-{str(dtype)}.pt')\n"
        "print(json.dumps(errors))\n"
    )
    assert_baseline_loops_match_vectorized(script, tmp_path)
