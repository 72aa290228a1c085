"""Mix-FFN (mixffn_fc2 with the dwconv + GELU in its operand load, mixffn) against the fp64 reference."""

import pytest
import torch

from segformer_fast.kernels import common as kernel_common
from segformer_fast.kernels.mixffn import dwconv_gelu_ref, mixffn, mixffn_fc2, mixffn_ref
from segformer_fast.prepared.weights import prepare_mixffn_params

from helpers import assert_within_tolerance, poison_

#: Every block width of B0 (32, 64, 160, 256) and B1-B5 (64, 128, 320, 512); hidden width 4C.
WIDTHS = [32, 64, 128, 160, 256, 320, 512]


def make_params(randn, C, dtype, ref_dtype=torch.float64):
    C4 = 4 * C
    raw = (randn(C4, C, scale=C**-0.5), randn(C4, scale=0.5), randn(C4, 1, 3, 3, scale=1 / 3), randn(C4, scale=0.5),
           randn(C, C4, scale=C4**-0.5), randn(C, scale=0.5))
    return prepare_mixffn_params(*raw, dtype=dtype), prepare_mixffn_params(*raw, dtype=ref_dtype)


def run_mixffn(randn, device, dtype, B, H, W, C, residual_scale=1.0, ref_dtype=torch.float64):
    params, params_ref = make_params(randn, C, dtype, ref_dtype)
    x = randn(B, H * W, C, dtype=dtype)
    residual = randn(B, H * W, C, scale=residual_scale, dtype=dtype)
    out = poison_(torch.empty_like(x))
    y = mixffn(x, H, W, params, residual=residual, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    ref = mixffn_ref(x.to(ref_dtype), H, W, params_ref, residual=residual.to(ref_dtype))
    eager = mixffn_ref(x, H, W, params, residual=residual, upcast=False)
    assert_within_tolerance(y, ref, dtype, eager=eager, what=f"mixffn C={C}")
    return y


@pytest.mark.parametrize("C", WIDTHS)
def test_mixffn(randn, device, dtype, C):
    H, W = (7, 9) if C <= 128 else (5, 3)  # B*N = 126 / 30 tokens: several / one row block, masked tails
    run_mixffn(randn, device, dtype, 2, H, W, C)


@pytest.mark.parametrize("B, H, W, C", [(3, 1, 1, 32), (1, 1, 7, 64), (3, 6, 1, 32), (1, 13, 11, 32)])
def test_mixffn_awkward_shapes(randn, device, B, H, W, C):
    run_mixffn(randn, device, torch.float32, B, H, W, C)
    run_mixffn(randn, device, torch.float16, B, H, W, C)


@pytest.mark.parametrize("wave", [1, 132], ids=["largest-tiles", "wave"])
@pytest.mark.parametrize("C", [32, 160])
def test_mixffn_fc2_without_residual(randn, device, dtype, C, wave, monkeypatch):
    """With a wave of one block fc2 takes its largest row tiles (32 rows and 16-deep K steps at C = 160)."""
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", wave)
    params, params64 = make_params(randn, C, dtype)
    H, W = 5, 7
    h = randn(2, H * W, 4 * C, dtype=dtype)
    y = mixffn_fc2(h, H, W, params.dw_weight, params.dw_bias, params.fc2_weight, params.fc2_bias,
                   out=poison_(torch.empty(2, H * W, C, device=device, dtype=dtype)))

    def composed(h, p, upcast):
        act = dwconv_gelu_ref(h, H, W, p.dw_weight, p.dw_bias, upcast=upcast)
        return torch.nn.functional.linear(act, p.fc2_weight.to(act.dtype), p.fc2_bias.to(act.dtype))

    assert_within_tolerance(y, composed(h.double(), params64, True), dtype, eager=composed(h, params, False),
                            what="mixffn_fc2")


def test_mixffn_large_magnitude_fp16(randn, device):
    """Residual stream around 1e4 in fp16 (the FFN branch adds O(1)): finite and within tolerance."""
    y = run_mixffn(randn, device, torch.float16, 2, 5, 7, 64, residual_scale=1e4)
    assert torch.isfinite(y).all()


def test_mixffn_input_checks(randn, device, other_device):
    params, _ = make_params(randn, 32, torch.float32)
    x = randn(1, 12, 32, dtype=torch.float32)
    h = randn(1, 12, 128, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"H, W: expected H \* W == N=12 with H, W >= 1, got H=4, W=4"):
        mixffn(x, 4, 4, params)
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 64\), got \(128, 32\)"):
        mixffn(randn(1, 12, 64, dtype=torch.float32), 3, 4, params)
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float16, got torch.float32"):
        mixffn(x.half(), 3, 4, params)
    with pytest.raises(ValueError, match=r"x: expected a (cpu|cuda) tensor, got device"):
        mixffn(x.to(other_device), 3, 4, params)
    with pytest.raises(ValueError, match=r"dw_weight: expected shape \(64, 1, 3, 3\), got \(128, 1, 3, 3\)"):
        mixffn_fc2(h[..., :64].contiguous(), 3, 4, params.dw_weight, params.dw_bias, params.fc2_weight,
                   params.fc2_bias)
    with pytest.raises(ValueError, match=r"h: expected 3 dims with shape \(\*, \*, \*\), got 2 dims"):
        mixffn_fc2(h[0], 3, 4, params.dw_weight, params.dw_bias, params.fc2_weight, params.fc2_bias)
    with pytest.raises(ValueError, match=r"residual: expected shape \(1, 12, 32\), got \(1, 12, 16\)"):
        mixffn_fc2(h, 3, 4, params.dw_weight, params.dw_bias, params.fc2_weight, params.fc2_bias,
                   residual=x[..., :16].contiguous())
    with pytest.raises(TypeError, match=r"params: expected MixFFNParams, got dict"):
        mixffn(x, 3, 4, {})


def test_mixffn_compiles_for_sm90(record_launches, compile_for_sm90, device):
    for C in WIDTHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            params = prepare_mixffn_params(torch.empty(4 * C, C), torch.empty(4 * C), torch.empty(4 * C, 1, 3, 3),
                                           torch.empty(4 * C), torch.empty(C, 4 * C), torch.empty(C), dtype=dtype)
            x = torch.empty(1, 64, C, dtype=dtype)
            mixffn(x, 8, 8, params, residual=x)
    compile_for_sm90(record_launches)


@pytest.mark.cuda
@pytest.mark.parametrize("C", [32, 64], ids=["B0", "B5"])
@pytest.mark.parametrize("H, W", [(128, 128), (256, 512)], ids=["512x512", "1024x2048"])
def test_mixffn_stage1_full_size(randn, device, C, H, W):
    run_mixffn(randn, device, torch.float16, 1, H, W, C, ref_dtype=torch.float32)


#: (C, H = W) of every stage at 512x512: B0, then B1-B5.
ENGINE_SHAPES = [(32, 128), (64, 64), (160, 32), (256, 16), (64, 128), (128, 64), (320, 32), (512, 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("C, size", ENGINE_SHAPES, ids=["B0s1", "B0s2", "B0s3", "B0s4", "B1s1", "B1s2", "B1s3", "B1s4"])
def test_mixffn_engine_shapes(randn, device, dtype, C, size):
    """Every stage's real shape at 512x512, batch 1, in each dtype (the CPU variant is test_mixffn)."""
    run_mixffn(randn, device, dtype, 1, size, size, C)
