"""segformer_fast._C's CPU kv_attention op (softmax(q kᵀ) v per head over SR attention's merged k/v, the scores
kept per block of query rows) against scaled_dot_product_attention in fp64, its input checks, opcheck, and its
baseline (non-AVX-512) loops."""

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.ops import cpu, reference
from segformer_fast.ops import extension as ops

from helpers import assert_baseline_loops_match_vectorized, assert_within_tolerance

needs_kernel = pytest.mark.skipif(not ops._has_kernel("kv_attention", torch.device("cpu")),
                                  reason="segformer_fast._C is not built (no CPU kv_attention kernel)")

# (batch, N, Nkv, heads, head dim): SegFormer's stages (head dims 32 and 64), ragged row blocks and score widths
# that are no multiple of 16 or 64, head dims over 64 (the baseline loops), one key
SHAPES = ((1, 1024, 256, 1, 32), (2, 77, 13, 2, 64), (1, 70, 100, 5, 32), (2, 33, 1, 8, 48), (1, 9, 70, 2, 80),
          (1, 5, 7, 3, 16))


def make_inputs(batch, tokens, num_kv, heads, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    q = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64) * head_dim ** -0.25
    kv = torch.randn(batch, num_kv, 2 * channels, generator=generator, dtype=torch.float64) * head_dim ** -0.25
    return q.to(dtype), kv.to(dtype)


def sdpa_reference(q, kv, heads):
    """scaled_dot_product_attention in fp64 on the head-major split (scale 1: q comes scaled)."""
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q = q.double().view(batch, tokens, heads, head_dim).transpose(1, 2)
    kv = kv.double().view(batch, -1, 2, heads, head_dim)
    out = F.scaled_dot_product_attention(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), scale=1.0)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_attention_matches_fp64_sdpa(shape, dtype):
    q, kv = make_inputs(*shape, dtype, seed=sum(shape))
    heads = shape[3]
    got = torch.ops.segformer_fast.kv_attention(q, kv, heads)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    eager = reference.kv_attention(q, kv, heads)  # plain PyTorch in the same dtype
    assert_within_tolerance(got, sdpa_reference(q, kv, heads), dtype, eager=eager)


@needs_kernel
def test_kv_attention_falls_back_to_the_cpu_row_blocks(monkeypatch):
    q, kv = make_inputs(2, 50, 20, 2, 32, torch.float32, seed=3)
    kernel = torch.ops.segformer_fast.kv_attention(q, kv, 2)
    assert torch.equal(ops.kv_attention(q, kv, 2), kernel)
    monkeypatch.setitem(ops._KERNEL_DEVICES, "kv_attention", frozenset())
    monkeypatch.setattr(ops, "_warned", True)
    fallback = ops.kv_attention(q, kv, 2)
    assert torch.equal(fallback, cpu.attention_by_row_chunks(q, kv, 2))
    assert_within_tolerance(fallback, sdpa_reference(q, kv, 2), torch.float32)


@needs_kernel
def test_kv_attention_nan_in_one_key_poisons_every_row_of_its_head_only():
    q, kv = make_inputs(1, 40, 9, 2, 32, torch.float32, seed=4)
    kv[0, 3, 5] = float("nan")  # key 3, head 0
    got = torch.ops.segformer_fast.kv_attention(q, kv, 2)
    assert got[..., :32].isnan().all() and not got[..., 32:].isnan().any()
    reference = sdpa_reference(q, kv, 2)
    assert_within_tolerance(got[..., 32:], reference[..., 32:], torch.float32)


@needs_kernel
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, kv, h: (q[0], kv, h), "q must be 3-D"),
        (lambda q, kv, h: (q, kv[0], h), "kv must be 3-D"),
        (lambda q, kv, h: (q, kv[..., :-2], h), r"kv must have shape \(B, Nkv, 2C\)"),
        (lambda q, kv, h: (q, kv[:, :0], h), "at least one token"),
        (lambda q, kv, h: (q, kv, 5), "heads must divide"),
        (lambda q, kv, h: (q, kv.double(), h), "dtype mismatch"),
        (lambda q, kv, h: (q.to(torch.int32), kv.to(torch.int32), h), "expected float32, float16 or bfloat16"),
        (lambda q, kv, h: (q.transpose(0, 1).contiguous().transpose(0, 1), kv, h), "must be contiguous"),
    ],
)
def test_kv_attention_input_checks(change, message):
    q, kv, heads = change(*make_inputs(2, 6, 4, 2, 16, torch.float32, seed=5), 2)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.segformer_fast.kv_attention(q, kv, heads)


@needs_kernel
def test_kv_attention_opcheck():
    q, kv = make_inputs(2, 10, 6, 2, 16, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.segformer_fast.kv_attention.default, (q, kv, 2))


@needs_kernel
def test_kv_attention_baseline_loops_match_the_vectorized_ones(tmp_path):
    """SEGFORMER_FAST_CPU_BASELINE=1 (read once per process) runs the loops built for the baseline ISA: two fresh
    processes compute the same inputs, one each way; both agree with fp64, and on a CPU with AVX-512 their fp32
    outputs differ in the last bits (std::exp against the vectorized exp), which shows the switch took effect."""
    script = (
        "import json, sys, torch\n"
        "import segformer_fast.ops.extension\n"
        "from segformer_fast.ops import reference\n"
        "from segformer_fast.core.numerics import max_abs_error\n"
        "errors = {}\n"
        "g = torch.Generator().manual_seed(7)\n"
        "q = torch.randn(2, 70, 64, generator=g, dtype=torch.float64) / 3\n"
        "kv = torch.randn(2, 37, 128, generator=g, dtype=torch.float64) / 3\n"
        "ref = reference.kv_attention(q, kv, 2)\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    got = torch.ops.segformer_fast.kv_attention(q.to(dtype), kv.to(dtype), 2)\n"
        "    eager = reference.kv_attention(q.to(dtype), kv.to(dtype), 2)\n"
        "    errors[str(dtype)] = [max_abs_error(got, ref), max_abs_error(eager, ref), float(ref.abs().max())]\n"
        "    torch.save(got, f'{sys.argv[1]}-{str(dtype)}.pt')\n"
        "print(json.dumps(errors))\n"
    )
    assert_baseline_loops_match_vectorized(script, tmp_path)
