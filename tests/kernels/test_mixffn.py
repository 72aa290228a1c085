"""Mix-FFN (mixffn_fc2 with the dwconv + GELU in its operand load, mixffn) against the fp64 reference.

At these small shapes the grid of row blocks is short of a wave, so at the real wave (132) fc2 takes its split form
(the 4C reduction split over the grid into fp32 partials, then their sum); a wave of one block forces the single
launch."""

import pytest
import torch

from segformer_fast.kernels import common as kernel_common
from segformer_fast.kernels.mixffn import mixffn, mixffn_fc2, mixffn_fc2_launches, mixffn_fc2_ref, mixffn_ref
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


@pytest.mark.parametrize("B, H, W, C", [(3, 1, 1, 32), (1, 1, 7, 64), (3, 6, 1, 32), (1, 13, 11, 32)])
def test_mixffn_awkward_shapes(randn, device, B, H, W, C):
    run_mixffn(randn, device, torch.float32, B, H, W, C)
    run_mixffn(randn, device, torch.float16, B, H, W, C)


@pytest.mark.parametrize("C", WIDTHS)
def test_mixffn(randn, device, dtype, C):
    H, W = (7, 9) if C <= 128 else (5, 3)  # B*N = 126 / 30 tokens: several / one row block, masked tails
    run_mixffn(randn, device, dtype, 2, H, W, C)


@pytest.mark.parametrize("C", [32, 160])
def test_mixffn_single_launch(randn, device, dtype, C, monkeypatch):
    """With a wave of one block fc2 is one launch with its largest row tiles (all C4 channels per block)."""
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", 1)
    assert not mixffn_fc2_launches(2 * 5 * 7, C, 4 * C, dtype)[0].meta["SPLIT"]
    run_mixffn(randn, device, dtype, 2, 5, 7, C)


def run_mixffn_fc2(randn, device, dtype, B, H, W, C, C4, residual):
    """mixffn_fc2 on fresh random h (B, H*W, C4) and weights against ``mixffn_fc2_ref`` in fp64 (inputs drawn in
    fp64, then cast), with the eager error of ``dtype``."""
    exact = [randn(B, H * W, C4), randn(C4, 1, 3, 3, scale=1 / 3), randn(C4, scale=0.5),
             randn(C, C4, scale=C4**-0.5), randn(C, scale=0.5)]
    exact_residual = randn(B, H * W, C) if residual else None
    h, dw_weight, dw_bias, fc2_weight, fc2_bias = (t.to(dtype) for t in exact)
    res = None if exact_residual is None else exact_residual.to(dtype)
    out = poison_(torch.empty(B, H * W, C, device=device, dtype=dtype))
    y = mixffn_fc2(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=res, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    ref = mixffn_fc2_ref(exact[0], H, W, *exact[1:], residual=exact_residual)
    eager = mixffn_fc2_ref(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=res, upcast=False)
    assert_within_tolerance(y, ref, dtype, eager=eager, what=f"mixffn_fc2 C={C} C4={C4}")


#: (B, H, W, C, C4, wave, residual, splits): the split form at small shapes. 7 K chunks of 32 over 4 splits
#: (1, 2, 2, 2) with a masked K tail (200 = 6 x 32 + 8) and masked columns (40 = 32 + 16 - 8); every K chunk its
#: own split (a huge wave) with two column groups (160 = 128 + 32); batch 3 of one-pixel-wide images; odd H and W
#: with 8 chunks over 3 splits (2, 3, 3).
SPLIT_CASES = [(2, 5, 7, 40, 200, 16, True, 4), (1, 4, 5, 160, 72, 10**6, False, 3), (3, 6, 1, 32, 128, 132, True, 4),
               (2, 9, 7, 64, 256, 24, False, 3)]


@pytest.mark.parametrize("B, H, W, C, C4, wave, residual, splits", SPLIT_CASES,
                         ids=["uneven-splits", "one-chunk-per-split", "tall-batch3", "odd-hw"])
def test_mixffn_fc2_split_over_k(randn, device, dtype, B, H, W, C, C4, wave, residual, splits, monkeypatch):
    """The 4C reduction split over the grid (fp32 partials, then their sum + bias + residual) matches the
    reference; the split counts named in SPLIT_CASES are the ones launched."""
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", wave)
    fc2, partial_sum = mixffn_fc2_launches(B * H * W, C, C4, dtype)
    assert fc2.meta["SPLIT"] and fc2.grid[1] == splits and partial_sum.kernel == "_mixffn_fc2_sum_kernel"
    assert ("own split" in fc2.reason) == (fc2.blocks < wave)
    run_mixffn_fc2(randn, device, dtype, B, H, W, C, C4, residual)


@pytest.mark.parametrize("C", [32, 160])
def test_mixffn_fc2_single_launch_without_residual(randn, device, dtype, C, monkeypatch):
    """With a wave of one block fc2 takes its largest row tiles (32 rows and 16-deep K steps at C = 160)."""
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", 1)
    run_mixffn_fc2(randn, device, dtype, 2, 5, 7, C, 4 * C, residual=False)


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
    """fc1 and fc2 at 64 tokens (fc2's split form: its partials kernel and their sum) at every width and dtype."""
    for C in WIDTHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            params = prepare_mixffn_params(torch.empty(4 * C, C), torch.empty(4 * C), torch.empty(4 * C, 1, 3, 3),
                                           torch.empty(4 * C), torch.empty(C, 4 * C), torch.empty(C), dtype=dtype)
            x = torch.empty(1, 64, C, dtype=dtype)
            mixffn(x, 8, 8, params, residual=x)
    assert {spec["name"] for spec in record_launches} == {"_linear_kernel", "_mixffn_fc2_kernel",
                                                          "_mixffn_fc2_sum_kernel"}
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


@pytest.mark.cuda
@pytest.mark.parametrize("C, size", [(320, 32), (512, 16)], ids=["B5s3", "B5s4"])
def test_mixffn_fc2_split_at_b5_batch1(randn, device, dtype, C, size, monkeypatch):
    """B5 stages 3 and 4 at 512², batch 1: fc2 splits its 4C reduction into at least a wave of blocks, and both
    the split and the single launch (forced by a wave of one block) match the reference."""
    launches = mixffn_fc2_launches(size * size, C, 4 * C, dtype)
    assert launches[0].meta["SPLIT"] and all(launch.blocks >= kernel_common.WAVE_BLOCKS for launch in launches)
    run_mixffn_fc2(randn, device, dtype, 1, size, size, C, 4 * C, residual=True)
    monkeypatch.setattr(kernel_common, "WAVE_BLOCKS", 1)
    assert not mixffn_fc2_launches(size * size, C, 4 * C, dtype)[0].meta["SPLIT"]
    run_mixffn_fc2(randn, device, dtype, 1, size, size, C, 4 * C, residual=True)
