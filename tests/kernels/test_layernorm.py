"""layer_norm (plain and residual-fused) and patch_embed_layer_norm against their fp64 references."""

import pytest
import torch

from segformer_fast.kernels import common as kernel_common
from segformer_fast.kernels.layernorm import (
    layer_norm,
    layer_norm_ref,
    patch_embed_layer_norm,
    patch_embed_layer_norm_ref,
)

from helpers import assert_within_tolerance, poison_

WIDTHS = [32, 64, 128, 160, 256, 320, 512]


def _affine(randn, C, dtype):
    return randn(C, scale=0.3, shift=1.0, dtype=dtype), randn(C, scale=0.3, dtype=dtype)


@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm(randn, device, dtype, C, with_residual):
    B, N = 3, 37  # rows = 111: several programs for every width, masked tail
    x = randn(B, N, C, scale=2.0, shift=0.5, dtype=dtype)
    r = randn(B, N, C, dtype=dtype) if with_residual else None
    w, b = _affine(randn, C, dtype)
    eps = 1e-6
    out = poison_(torch.empty_like(x))
    if with_residual:
        out_sum = poison_(torch.empty_like(x))
        y, s = layer_norm(x, w, b, eps, residual=r, out=out, out_sum=out_sum)
        assert y.data_ptr() == out.data_ptr() and s.data_ptr() == out_sum.data_ptr()
        y_ref, s_ref = layer_norm_ref(x.double(), w.double(), b.double(), eps, residual=r.double())
        y_eager, s_eager = layer_norm_ref(x, w, b, eps, residual=r, upcast=False)
        assert_within_tolerance(s, s_ref, dtype, eager=s_eager, what="x + residual")
    else:
        y = layer_norm(x, w, b, eps, out=out)
        y_ref = layer_norm_ref(x.double(), w.double(), b.double(), eps)
        y_eager = layer_norm_ref(x, w, b, eps, upcast=False)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_tolerance(y, y_ref, dtype, eager=y_eager, what="layer_norm")


@pytest.mark.parametrize("C", [32, 160])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_largest_tiles(randn, device, dtype, C, with_residual, monkeypatch):
    """A wave of one block: the launcher takes its largest row tiles (the test above, at 132, takes 1-row tiles)."""
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", 1)
    test_layer_norm(randn, device, dtype, C, with_residual)


@pytest.mark.parametrize("B, C, H, W", [(2, 32, 7, 9), (1, 64, 3, 5), (3, 160, 5, 4), (2, 512, 1, 3)])
def test_patch_embed_layer_norm(randn, device, dtype, B, C, H, W):
    x = randn(B, C, H, W, scale=3.0, shift=-1.0, dtype=dtype)
    w, b = _affine(randn, C, dtype)
    out = poison_(torch.empty(B, H * W, C, device=device, dtype=dtype))
    y = patch_embed_layer_norm(x, w, b, 1e-5, out=out)
    y_ref = patch_embed_layer_norm_ref(x.double(), w.double(), b.double(), 1e-5)
    y_eager = patch_embed_layer_norm_ref(x, w, b, 1e-5, upcast=False)
    assert_within_tolerance(y, y_ref, dtype, eager=y_eager, what="patch_embed_layer_norm")


@pytest.mark.parametrize("C", [64, 512])
def test_layer_norm_large_magnitude_fp16(randn, device, C):
    """fp16 inputs around 1e3-1e4 (sum of squares overflows fp16): fp32 statistics keep the result finite."""
    dtype = torch.float16
    x = randn(2, 45, C, scale=3e3, shift=5e3, dtype=dtype)
    r = randn(2, 45, C, scale=1e3, dtype=dtype)
    w, b = _affine(randn, C, dtype)
    y, s = layer_norm(x, w, b, 1e-6, residual=r)
    y_ref, s_ref = layer_norm_ref(x.double(), w.double(), b.double(), 1e-6, residual=r.double())
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_within_tolerance(s, s_ref, dtype, what="x + residual")
    assert_within_tolerance(y, y_ref, dtype, what="layer_norm of large fp16 inputs")
    img = randn(1, C, 5, 7, scale=3e3, shift=8e3, dtype=dtype)
    y = patch_embed_layer_norm(img, w, b, 1e-5)
    assert torch.isfinite(y).all()
    assert_within_tolerance(y, patch_embed_layer_norm_ref(img.double(), w.double(), b.double(), 1e-5), dtype,
                            what="patch_embed_layer_norm of large fp16 inputs")


def test_layer_norm_input_checks(randn, device, other_device):
    x = randn(2, 5, 64, dtype=torch.float32)
    w, b = _affine(randn, 64, torch.float32)
    with pytest.raises(ValueError, match=r"weight: expected shape \(64,\), got \(32,\)"):
        layer_norm(x, w[:32], b, 1e-6)
    with pytest.raises(TypeError, match=r"bias: expected dtype torch.float32, got torch.float16"):
        layer_norm(x, w, b.half(), 1e-6)
    with pytest.raises(TypeError, match=r"x: expected dtype float32, float16 or bfloat16, got torch.float64"):
        layer_norm(x.double(), w.double(), b.double(), 1e-6)
    with pytest.raises(ValueError, match=r"x: expected a (cpu|cuda) tensor, got device"):
        layer_norm(x.to(other_device), w, b, 1e-6)
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 5, 64\), got \(2, 6, 64\)"):
        layer_norm(x, w, b, 1e-6, residual=randn(2, 6, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"x: expected a contiguous tensor"):
        layer_norm(x.transpose(0, 1), w, b, 1e-6)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 5, 64\), got \(2, 5, 32\)"):
        layer_norm(x, w, b, 1e-6, out=torch.empty(2, 5, 32, device=device))
    with pytest.raises(ValueError, match=r"x: expected 4 dims with shape \(\*, \*, \*, \*\), got 3 dims"):
        patch_embed_layer_norm(x, w, b, 1e-5)
    with pytest.raises(ValueError, match=r"eps: expected a positive number, got 0"):
        layer_norm(x, w, b, 0)


def test_layer_norm_compiles_for_sm90(record_launches, compile_for_sm90, device):
    for C in WIDTHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.empty(1, 4, C, dtype=dtype)
            w = torch.empty(C, dtype=dtype)
            layer_norm(x, w, w, 1e-6)
            layer_norm(x, w, w, 1e-6, residual=x)
            patch_embed_layer_norm(torch.empty(1, C, 2, 2, dtype=dtype), w, w, 1e-5)
    compile_for_sm90(record_launches)


@pytest.mark.cuda
@pytest.mark.parametrize("C, H, W", [(32, 128, 128), (64, 128, 128), (32, 256, 512), (64, 256, 512)],
                         ids=["B0-512", "B5-512", "B0-1024x2048", "B5-1024x2048"])
def test_layer_norm_stage1_full_size(randn, device, C, H, W):
    dtype = torch.float16
    w, b = _affine(randn, C, dtype)
    img = randn(1, C, H, W, scale=2.0, dtype=dtype)
    y = patch_embed_layer_norm(img, w, b, 1e-5)
    assert_within_tolerance(y, patch_embed_layer_norm_ref(img.float(), w.float(), b.float(), 1e-5), dtype,
                            eager=patch_embed_layer_norm_ref(img, w, b, 1e-5, upcast=False), what="patch-embed LN")
    x = y.contiguous()
    r = randn(1, H * W, C, dtype=dtype)
    y, s = layer_norm(x, w, b, 1e-6, residual=r)
    y_ref, _ = layer_norm_ref(x.float(), w.float(), b.float(), 1e-6, residual=r.float())
    y_eager, _ = layer_norm_ref(x, w, b, 1e-6, residual=r, upcast=False)
    assert_within_tolerance(y, y_ref, dtype, eager=y_eager, what="residual LN")
