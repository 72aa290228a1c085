"""Spatial-reduction attention (sr_kv, flash_sr_attention, sr_attention) against the fp64 reference."""

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.kernels import common as kernel_common
from segformer_fast.kernels.sr_attention import (
    flash_sr_attention,
    reduced_size,
    sr_attention,
    sr_attention_ref,
    sr_kv,
    sr_kv_ref,
)
from segformer_fast.prepared.weights import prepare_sr_attention_params

from helpers import assert_within_tolerance, poison_

#: (C, heads, sr_ratio) of every stage: B0, then B1-B5.
STAGES = [(32, 1, 8), (64, 2, 4), (160, 5, 2), (256, 8, 1), (64, 1, 8), (128, 2, 4), (320, 5, 2), (512, 8, 1)]
STAGE_IDS = ["B0s1", "B0s2", "B0s3", "B0s4", "B1s1", "B1s2", "B1s3", "B1s4"]
#: Spatial sizes per sr_ratio, scaled down: H, W not multiples of R, two query blocks (masked tail); R == 1 gives
#: 81 reduced tokens (two KV blocks with a masked tail).
SIZES = {8: (17, 19), 4: (13, 10), 2: (11, 9), 1: (9, 9)}


def raw_weights(randn, C, R, sr_scale=1.0):
    """Random block weights in fp64 (nn.Linear / nn.Conv2d layouts), SR LayerNorm affine away from 1/0."""
    def lin():
        return randn(C, C, scale=C**-0.5), randn(C, scale=0.5)

    q_w, q_b = lin()
    k_w, k_b = lin()
    v_w, v_b = lin()
    o_w, o_b = lin()
    if R > 1:
        sr = (randn(C, C, R, R, scale=sr_scale * (C * R * R) ** -0.5), randn(C, scale=0.5),
              randn(C, scale=0.3, shift=1.0), randn(C, scale=0.3))
    else:
        sr = (None, None, None, None)
    return (q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, *sr)


def raw_reference(x, residual, H, W, weights, num_heads, eps):
    """Independent fp64 formula from the raw weights (docs/DESIGN.md section 3), scale applied to the scores."""
    q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, sr_w, sr_b, ln_w, ln_b = weights
    B, N, C = x.shape
    d = C // num_heads
    kv_in = x
    if sr_w is not None:
        img = x.transpose(1, 2).reshape(B, C, H, W)
        kv_in = F.conv2d(img, sr_w, sr_b, stride=sr_w.shape[-1]).flatten(2).transpose(1, 2)
        kv_in = F.layer_norm(kv_in, (C,), ln_w, ln_b, eps)

    def heads(t):
        return t.reshape(B, -1, num_heads, d).transpose(1, 2)

    q, k, v = heads(F.linear(x, q_w, q_b)), heads(F.linear(kv_in, k_w, k_b)), heads(F.linear(kv_in, v_w, v_b))
    attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, -1) @ v
    return residual + F.linear(attn.transpose(1, 2).reshape(B, N, C), o_w, o_b)


def run_case(randn, device, dtype, B, H, W, C, heads, R, residual_scale=1.0, sr_scale=1.0, ref_dtype=torch.float64):
    weights = raw_weights(randn, C, R, sr_scale)
    eps = 1e-5
    params64 = prepare_sr_attention_params(*weights, eps, heads, dtype=ref_dtype)
    params = prepare_sr_attention_params(*weights, eps, heads, dtype=dtype)
    x = randn(B, H * W, C, dtype=dtype)
    residual = randn(B, H * W, C, scale=residual_scale, dtype=dtype)
    out = poison_(torch.empty_like(x))
    y = sr_attention(x, residual, H, W, params, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    ref = sr_attention_ref(x.to(ref_dtype), residual.to(ref_dtype), H, W, params64)
    eager = sr_attention_ref(x, residual, H, W, params, upcast=False)
    assert_within_tolerance(y, ref, dtype, eager=eager, what=f"sr_attention C={C} heads={heads} R={R}")
    return y, ref


@pytest.mark.parametrize("C, heads, R", STAGES, ids=STAGE_IDS)
def test_sr_attention_stages(randn, device, dtype, C, heads, R):
    H, W = SIZES[R]
    run_case(randn, device, dtype, 2, H, W, C, heads, R)


@pytest.mark.parametrize(
    "B, H, W, C, heads, R",
    [
        (3, 8, 8, 32, 1, 8),  # exactly one reduced token
        (1, 9, 15, 64, 2, 8),  # Hkv = 1, Wkv = 1: W not a multiple of R
        (3, 1, 3, 32, 1, 1),  # N < BLOCK_M, Nkv = 3
        (1, 5, 14, 512, 8, 1),  # N = Nkv = 70: two query and KV blocks, fallback output projection
        (2, 11, 6, 160, 5, 2),  # odd H
        (1, 4, 4, 256, 8, 4),  # eight heads with an SR ratio > 1
    ],
)
def test_sr_attention_awkward_shapes(randn, device, B, H, W, C, heads, R):
    run_case(randn, device, torch.float32, B, H, W, C, heads, R)
    run_case(randn, device, torch.float16, B, H, W, C, heads, R)


@pytest.mark.parametrize("wave", [1, 132], ids=["largest-tiles", "wave"])
@pytest.mark.parametrize("C, heads, R", [(64, 2, 4), (320, 5, 2), (256, 8, 1)])
def test_sr_kv_and_flash_separately(randn, device, dtype, C, heads, R, wave, monkeypatch):
    """With a wave of 1 block the launchers take their largest tiles (one fused sr_kv kernel, the output
    projection fused where C allows); with 132 these small shapes take the split sr_kv and heads in the grid."""
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", wave)
    H, W = SIZES[R]
    weights = raw_weights(randn, C, R)
    params = prepare_sr_attention_params(*weights, 1e-5, heads, dtype=dtype)
    params64 = prepare_sr_attention_params(*weights, 1e-5, heads)
    x = randn(2, H * W, C, dtype=dtype)
    Hkv, Wkv = reduced_size(H, W, R)
    kv = sr_kv(x, H, W, params, out=poison_(torch.empty(2, Hkv * Wkv, 2 * C, device=device, dtype=dtype)))
    assert_within_tolerance(kv, sr_kv_ref(x.double(), H, W, params64), dtype,
                            eager=sr_kv_ref(x, H, W, params, upcast=False), what="sr_kv")
    y = flash_sr_attention(x, kv, params, out=poison_(torch.empty_like(x)))
    ref = sr_attention_ref(x.double(), None, H, W, params64)
    assert_within_tolerance(y, ref, dtype, eager=sr_attention_ref(x, None, H, W, params, upcast=False),
                            what="flash_sr_attention without residual")


@pytest.mark.parametrize("C, heads, R", [(64, 2, 4), (512, 8, 1)])
def test_prepared_reference_matches_raw_formula(randn, device, C, heads, R):
    """prepare_sr_attention_params (scale fold, k/v merge, patchify layout) + the reference == the raw math."""
    H, W = SIZES[R]
    weights = raw_weights(randn, C, R)
    x, residual = randn(2, H * W, C), randn(2, H * W, C)
    ref = sr_attention_ref(x, residual, H, W, prepare_sr_attention_params(*weights, 1e-5, heads))
    expected = raw_reference(x, residual, H, W, weights, heads, 1e-5)
    assert float((ref - expected).abs().max()) < 1e-10 * float(expected.abs().max())


def test_sr_attention_large_magnitude_fp16(randn, device):
    """Residual stream around 1e4 and an SR-LayerNorm input around 1e3-1e4 in fp16: finite, within tolerance."""
    y, _ = run_case(randn, device, torch.float16, 2, 17, 19, 64, 1, 8, residual_scale=1e4, sr_scale=3e3)
    assert torch.isfinite(y).all()


def test_sr_attention_input_checks(randn, device, other_device):
    C = 64
    params = prepare_sr_attention_params(*raw_weights(randn, C, 4), 1e-5, 2, dtype=torch.float32)
    x = randn(1, 35, C, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x_norm: expected 3 dims with shape \(\*, \*, \*\), got 2 dims"):
        sr_attention(x[0], None, 5, 7, params)
    with pytest.raises(ValueError, match=r"params: expected weights for C=32 channels \(from x_norm\), got C=64"):
        sr_attention(x[..., :32].contiguous(), None, 5, 7, params)
    with pytest.raises(ValueError, match=r"H, W: expected H \* W == N=35 with H, W >= 1, got H=6, W=6"):
        sr_attention(x, None, 6, 6, params)
    with pytest.raises(TypeError, match=r"params.q_weight: expected dtype torch.float16, got torch.float32"):
        sr_attention(x.half(), None, 5, 7, params)
    with pytest.raises(ValueError, match=r"x_norm: expected a (cpu|cuda) tensor, got device"):
        sr_attention(x.to(other_device), None, 5, 7, params)
    with pytest.raises(ValueError, match=r"expected H >= R and W >= R for sr_ratio R=4 .* got H=3, W=12"):
        sr_attention(randn(1, 36, C, dtype=torch.float32), None, 3, 12, params)
    with pytest.raises(ValueError, match=r"residual: expected shape \(1, 35, 64\), got \(1, 35, 32\)"):
        sr_attention(x, x[..., :32].contiguous(), 5, 7, params)
    with pytest.raises(ValueError, match=r"kv: expected shape \(1, \*, 128\), got \(1, 4, 64\)"):
        flash_sr_attention(x, randn(1, 4, 64, dtype=torch.float32), params)
    with pytest.raises(ValueError, match=r"head_dim: expected a power of two in \[16, 128\] dividing C=48"):
        bad = prepare_sr_attention_params(*raw_weights(randn, 48, 1), 1e-5, 1, dtype=torch.float32)
        sr_attention(randn(1, 4, 48, dtype=torch.float32), None, 2, 2, bad)
    with pytest.raises(ValueError, match=r"num_heads: expected a divisor of C=64, got 3"):
        prepare_sr_attention_params(*raw_weights(randn, C, 1), 1e-5, 3)


def test_sr_attention_compiles_for_sm90(record_launches, compile_for_sm90, device):
    gen = torch.Generator().manual_seed(0)
    for C, heads, R in STAGES:
        # every dtype: fp16/bf16 must not spill, fp32 spills are reported
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            weights = [None if t is None else torch.randn(t.shape, generator=gen)
                       for t in raw_weights(lambda *s, **k: torch.empty(*s), C, R)]
            params = prepare_sr_attention_params(*weights, 1e-5, heads, dtype=dtype)
            for H, W in ((R, 2 * R), (16 * R, 16 * R)) if C == 32 else ((16 * R, 16 * R),):  # BLOCK_N 16 and 64
                x = torch.empty(1, H * W, C, dtype=dtype)
                sr_attention(x, x, H, W, params)
    compile_for_sm90(record_launches)


@pytest.mark.cuda
@pytest.mark.parametrize("C, heads", [(32, 1), (64, 1)], ids=["B0", "B5"])
@pytest.mark.parametrize("H, W", [(128, 128), (256, 512)], ids=["512x512", "1024x2048"])
def test_sr_attention_stage1_full_size(randn, device, C, heads, H, W):
    run_case(randn, device, torch.float16, 1, H, W, C, heads, 8, ref_dtype=torch.float32)


#: (C, heads, R, H = W) of every stage at 512x512: B0, then B1-B5.
ENGINE_SHAPES = [(32, 1, 8, 128), (64, 2, 4, 64), (160, 5, 2, 32), (256, 8, 1, 16),
                 (64, 1, 8, 128), (128, 2, 4, 64), (320, 5, 2, 32), (512, 8, 1, 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("C, heads, R, size", ENGINE_SHAPES, ids=STAGE_IDS)
def test_sr_attention_engine_shapes(randn, device, dtype, C, heads, R, size):
    """Every stage's real shape at 512x512, batch 1, in each dtype (the launches the engine makes there; the CPU
    variant is test_sr_attention_stages at scaled-down sizes). fp64 reference: cuDNN's fp32 conv may use TF32."""
    run_case(randn, device, dtype, 1, size, size, C, heads, R)
