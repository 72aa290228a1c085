"""segformer_fast._C's CPU fused_decode_tokens op (fused_decode with the stage-1 map projected from the stage-1
tokens inside the op, per block of rows) against the fp64 composition (projection, upsampling, sum, bias, ReLU,
classifier) by the tolerance rule, its input checks, opcheck, and its fallback."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.ops import extension as ops
from segformer_fast.ops import reference

from helpers import assert_within_tolerance

needs_kernel = pytest.mark.skipif(not ops._has_kernel("fused_decode_tokens", torch.device("cpu")),
                                  reason="segformer_fast._C is not built (no CPU fused_decode_tokens kernel)")

# stage grids (h_i, w_i): a 512x512 image's, odd ratios, 1-wide maps, one long row (tasks of several rows)
GRIDS = (((128, 128), (64, 64), (32, 32), (16, 16)), ((31, 20), (16, 10), (8, 5), (4, 3)),
         ((13, 6), (1, 1), (2, 5), (5, 1)), ((3, 300), (2, 150), (1, 75), (1, 38)))


def make_inputs(grids, batch, channels, dim, num_labels, dtype, seed):
    """Stage-1 tokens (B, h1, w1, C1), w1 (D, C1), projected maps P2..P4 and the head's bias and classifier."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    (h1, w1), *later = grids
    tokens = randn(batch, h1, w1, channels)
    weight = randn(dim, channels, scale=channels ** -0.5)
    maps = [randn(batch, h, w, dim) for h, w in later]
    return tokens, weight, maps, randn(dim, scale=0.5), randn(num_labels, dim, scale=dim ** -0.5), randn(num_labels)


def composition(tokens, weight, maps, bias, cls_weight, cls_bias, dtype):
    """Projection, bilinear upsampling to the stage-1 grid, sum, bias, ReLU, classifier: eager in `dtype`."""
    total = (tokens.to(dtype) @ weight.to(dtype).t()).permute(0, 3, 1, 2)
    for p in maps:
        total = total + F.interpolate(p.to(dtype).permute(0, 3, 1, 2), size=total.shape[2:], mode="bilinear",
                                      align_corners=False)
    hidden = torch.relu(total + bias.to(dtype)[:, None, None])
    return torch.einsum("bdhw,kd->bkhw", hidden, cls_weight.to(dtype)) + cls_bias.to(dtype)[:, None, None]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grids", GRIDS)
def test_fused_decode_tokens_matches_fp64(grids, dtype):
    inputs = make_inputs(grids, batch=2, channels=48, dim=96, num_labels=19, dtype=dtype, seed=sum(grids[0]))
    got = torch.ops.segformer_fast.fused_decode_tokens(*inputs[:2], *inputs[2], *inputs[3:])
    tokens = inputs[0]
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (2, 19, *tokens.shape[1:3])
    expected = composition(*inputs, dtype=torch.float64)
    assert_within_tolerance(got, expected, dtype, eager=composition(*inputs, dtype=dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_tokens_equals_fused_decode_of_the_projection(dtype):
    """The op is fused_decode with p1 = t1 w1ᵀ in the tokens' dtype: both agree within the rounding of p1."""
    tokens, weight, maps, bias, cls_weight, cls_bias = make_inputs(GRIDS[1], 3, 32, 64, 11, dtype, seed=3)
    got = torch.ops.segformer_fast.fused_decode_tokens(tokens, weight, *maps, bias, cls_weight, cls_bias)
    p1 = (tokens @ weight.t()).contiguous()
    separate = ops.fused_decode(p1, *maps, bias, cls_weight, cls_bias)
    assert_within_tolerance(got, separate.double(), dtype, eager=separate)


@needs_kernel
def test_fused_decode_tokens_wrapper_and_fallback(monkeypatch):
    tokens, weight, maps, bias, cls_weight, cls_bias = make_inputs(GRIDS[1], 2, 32, 64, 7, torch.float32, seed=4)
    args = (tokens, weight, *maps, bias, cls_weight, cls_bias)
    kernel = torch.ops.segformer_fast.fused_decode_tokens(*args)
    assert torch.equal(ops.fused_decode_tokens(*args), kernel)
    monkeypatch.setitem(ops._KERNEL_DEVICES, "fused_decode_tokens", frozenset())
    fallback = ops.fused_decode_tokens(*args)  # the projection, then fused_decode
    assert torch.equal(fallback, ops.fused_decode(reference.linear(tokens, weight), *maps, bias, cls_weight, cls_bias))
    assert_within_tolerance(kernel, composition(*args[:2], maps, *args[5:], dtype=torch.float64), torch.float32,
                            eager=fallback)


def _args():
    tokens, weight, maps, bias, cls_weight, cls_bias = make_inputs(GRIDS[1], 2, 32, 64, 7, torch.float32, seed=5)
    return [tokens, weight, *maps, bias, cls_weight, cls_bias]


@needs_kernel
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "t1 must be 4-D stage-1 tokens (B, h, w, C1), got a 3-D"),
        (lambda a: a.__setitem__(1, a[1][:, :-1].contiguous()), "w1 must have shape (D, C1) with C1=32 as in t1"),
        (lambda a: a.__setitem__(2, a[2][..., :10].contiguous()), "channel mismatch: p2 has D=10 channels"),
        (lambda a: a.__setitem__(3, a[3][:1].contiguous()), "batch mismatch: p3 has B=1 but t1 has B=2"),
        (lambda a: a.__setitem__(5, a[5][:-1]), "bias must have shape (D,) = (64,)"),
        (lambda a: a.__setitem__(6, a[6][:, :-2].contiguous()), "expected (K, D) with D=64 as in w1"),
        (lambda a: a.__setitem__(1, a[1].double()), "dtype mismatch: w1 is"),
        (lambda a: a.__setitem__(0, a[0].transpose(1, 2)), "t1 must be contiguous"),
    ],
)
def test_fused_decode_tokens_input_checks(mutate, message):
    args = _args()
    mutate(args)
    with pytest.raises(RuntimeError) as info:
        torch.ops.segformer_fast.fused_decode_tokens(*args)
    assert message in str(info.value)


@needs_kernel
def test_fused_decode_tokens_opcheck():
    torch.library.opcheck(torch.ops.segformer_fast.fused_decode_tokens.default, tuple(_args()))


@needs_kernel
def test_fused_decode_tokens_baseline_loops_equal_the_vectorized_ones(tmp_path):
    """SEGFORMER_FAST_CPU_BASELINE=1 (read once per process) runs the loops built for the baseline ISA: a fresh
    process each way computes the same inputs. The hidden rows are summed in the same order, one fused multiply-add
    per tap, in every build, so the logits are equal bit for bit (the other tests hold the vectorized loops to fp64)."""
    script = (
        "import sys, torch\n"
        "import segformer_fast.ops.extension\n"
        "g = torch.Generator().manual_seed(11)\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    t1 = torch.randn(2, 31, 20, 48, generator=g).to(dtype)\n"
        "    w1 = (torch.randn(96, 48, generator=g) / 7).to(dtype)\n"
        "    maps = [torch.randn(2, h, w, 96, generator=g).to(dtype) for h, w in ((16, 10), (8, 5), (4, 3))]\n"
        "    head = (torch.randn(96, generator=g).to(dtype), (torch.randn(19, 96, generator=g) / 10).to(dtype),\n"
        "            torch.randn(19, generator=g).to(dtype))\n"
        "    out = torch.ops.segformer_fast.fused_decode_tokens(t1, w1, *maps, *head)\n"
        "    torch.save(out, f'{sys.argv[1]}-{str(dtype)}.pt')\n"
    )
    for baseline in ("0", "1"):
        env = {**os.environ, "SEGFORMER_FAST_CPU_BASELINE": baseline}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / baseline)], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    for dtype in ("torch.float32", "torch.bfloat16", "torch.float16"):
        vectorized, baseline = (torch.load(tmp_path / f"{way}-{dtype}.pt") for way in ("0", "1"))
        assert torch.equal(vectorized, baseline), f"{dtype}: max difference {(vectorized - baseline).abs().max()}"
