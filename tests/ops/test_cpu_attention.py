"""The CPU engine's attention core: PyTorch's fused attention (``cpu.sdpa_attention``) against an fp64 computation
written out (scores, softmax, product), the rule choosing it over the extension's ``kv_attention``, and an engine
run with each core forced."""

import pytest
import torch

from segformer_fast import Segformer
from segformer_fast.engine.engine import optimize
from segformer_fast.ops import cpu, reference

from helpers import assert_within_tolerance


def written_out_attention(q, kv, heads):
    """softmax(q kᵀ) v per head in fp64, step by step: q (B, N, C) head-major, kv (B, Nkv, 2C) = [k | v]."""
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q_heads = q.double().reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    k = kv.double()[..., :channels].reshape(batch, -1, heads, head_dim).transpose(1, 2)
    v = kv.double()[..., channels:].reshape(batch, -1, heads, head_dim).transpose(1, 2)
    scores = q_heads @ k.transpose(-1, -2)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, channels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "tokens", "kv_tokens", "heads", "head_dim"),
                         [(1, 67, 5, 1, 32), (2, 130, 33, 2, 32), (2, 41, 16, 5, 32), (1, 64, 64, 8, 64)])
def test_sdpa_attention_matches_fp64(dtype, batch, tokens, kv_tokens, heads, head_dim):
    generator = torch.Generator().manual_seed(tokens * heads + kv_tokens)
    channels = heads * head_dim
    q = (torch.randn(batch, tokens, channels, generator=generator) * 0.5).to(dtype)
    kv = torch.randn(batch, kv_tokens, 2 * channels, generator=generator).to(dtype)
    got = cpu.sdpa_attention(q, kv, heads)
    assert got.dtype == dtype and got.shape == (batch, tokens, channels) and got.is_contiguous()
    expected = written_out_attention(q, kv, heads)
    assert_within_tolerance(got, expected, dtype, reference.kv_attention(q, kv, heads),
                            what=f"sdpa_attention {dtype} {(batch, tokens, kv_tokens, heads)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_core_choice_follows_amx_and_the_override(monkeypatch, dtype):
    monkeypatch.delenv(cpu.ATTENTION_CORE_VARIABLE, raising=False)
    assert cpu.sdpa_attention_is_faster(dtype) == (dtype == torch.bfloat16 and cpu.cpu_has_amx())
    monkeypatch.setenv(cpu.ATTENTION_CORE_VARIABLE, "sdpa")
    assert cpu.sdpa_attention_is_faster(dtype) == (dtype != torch.float16)  # fp16 always takes the kernel
    monkeypatch.setenv(cpu.ATTENTION_CORE_VARIABLE, "kernel")
    assert not cpu.sdpa_attention_is_faster(dtype)


ATTENTION_OPS = {"sdpa": "aten::_scaled_dot_product_flash_attention_for_cpu", "kernel": "segformer_fast::kv_attention"}


@pytest.mark.parametrize("core", ["sdpa", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_with_each_attention_core_matches_the_reference(monkeypatch, core, dtype):
    """Each core, forced, runs in the engine (the profiler sees its op and not the other's) and the logits are
    within the tolerance rule of the fp32 reference, the reference in the engine's dtype as the eager error."""
    monkeypatch.setenv(cpu.ATTENTION_CORE_VARIABLE, core)
    model = Segformer.from_config("b0", num_labels=7, seed=5)
    engine = optimize(model, dtype=dtype, verify=False)
    pixels = torch.randn(2, 3, 67, 93, generator=torch.Generator().manual_seed(9))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        got = engine(pixels)
    ran = {event.name for event in profile.events()}
    if core == "kernel" and "segformer_fast::kv_attention" not in ran:
        pytest.skip("segformer_fast._C is not built (no CPU kv_attention kernel)")
    assert ATTENTION_OPS[core] in ran and ATTENTION_OPS["sdpa" if core == "kernel" else "kernel"] not in ran
    with torch.no_grad():
        expected = model(pixels)
        eager = model.to(dtype)(pixels.to(dtype)) if dtype != torch.float32 else None
    assert_within_tolerance(got, expected, dtype, eager, what=f"engine {dtype}, attention core {core}")
