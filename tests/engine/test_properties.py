"""Property tests (hypothesis) of the kernels, the decoder ops, the engine and the reference model.

Every property compares a fast path with its reference under the tolerance rule of docs/DESIGN.md section 5:
error(path, dtype) <= 2 x error(eager PyTorch in dtype) + floor(dtype) x max |ref|, the reference in fp64 (kernels,
decoder op) or fp32 (whole model). Examples are derandomized so CI is reproducible, and small: the Triton kernels
run in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
"""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segformer_fast.core.numerics import max_abs_error
from segformer_fast.engine.engine import optimize
from segformer_fast.inference.processing import output_size
from segformer_fast.jobs.metrics import MetricAccumulator
from segformer_fast.model.segformer import Segformer
from segformer_fast.ops import extension as ops

from helpers import assert_within_tolerance, counting_calls, poison_

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install -e .[test])")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Every embed dim of the variants (B0: 32/64/160/256, B1-B5: 64/128/320/512).
WIDTHS = [32, 64, 160, 256, 320, 512]
#: (C, heads, R) of every stage: B0, then B1-B5.
STAGES = [(32, 1, 8), (64, 2, 4), (160, 5, 2), (256, 8, 1), (64, 1, 8), (128, 2, 4), (320, 5, 2), (512, 8, 1)]
#: Widths from which the interpreter gets slow (seconds per call): such examples run at batch 1 (and, for
#: Mix-FFN, at most 64 tokens: one M block). Narrower widths cover batch 2 and several blocks.
WIDE = 320


def prop(max_examples):
    """Hypothesis settings of this file: few derandomized examples (reproducible CI), no deadline."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def randn(generator, *shape, scale=1.0, shift=0.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)


def check_rule(actual, reference, dtype, eager, what):
    """The tolerance rule, guarded so it cannot pass vacuously: a non-finite eager result would make the allowed
    error infinite, so the eager result and the reference must be finite."""
    assert torch.isfinite(reference).all(), f"{what}: the reference is not finite"
    assert torch.isfinite(eager.float()).all(), f"{what}: the eager {dtype} result is not finite (rule vacuous)"
    assert actual.dtype == dtype and actual.shape == reference.shape, (
        f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {dtype} {tuple(reference.shape)}"
    )
    assert_within_tolerance(actual, reference, dtype, eager=eager, what=what)


# --------------------------------------------------------------------------------------------- Triton kernels
@prop(20)
@given(
    C=st.sampled_from(WIDTHS), T=st.integers(1, 70), B=st.integers(1, 2), dtype=st.sampled_from(DTYPES),
    with_residual=st.booleans(), scale=st.sampled_from([0.1, 1.0, 30.0, 1000.0]), eps=st.sampled_from([1e-5, 1e-6]),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_norm_kernel(C, T, B, dtype, with_residual, scale, eps, seed):
    from segformer_fast.kernels.layernorm import layer_norm, layer_norm_ref

    g = torch.Generator().manual_seed(seed)
    # a per-token offset of 3 x scale: the variance must be that of the centred values
    x = randn(g, B, T, C, scale=scale, dtype=dtype) + randn(g, B, T, 1, scale=3 * scale, dtype=dtype)
    weight = randn(g, C, scale=0.3, shift=1.0, dtype=dtype)
    bias = randn(g, C, scale=0.3, dtype=dtype)
    residual = randn(g, B, T, C, scale=scale, dtype=dtype) if with_residual else None
    out = poison_(torch.empty_like(x))
    what = f"layer_norm C={C} T={T} B={B} {dtype} scale={scale} residual={with_residual}"
    if with_residual:
        out_sum = poison_(torch.empty_like(x))
        y, s = layer_norm(x, weight, bias, eps, residual=residual, out=out, out_sum=out_sum)
        assert s.data_ptr() == out_sum.data_ptr()
        y_ref, s_ref = layer_norm_ref(x.double(), weight.double(), bias.double(), eps, residual=residual.double())
        y_eager, s_eager = layer_norm_ref(x, weight, bias, eps, residual=residual, upcast=False)
        check_rule(s, s_ref, dtype, s_eager, what + " (sum)")
    else:
        y = layer_norm(x, weight, bias, eps, out=out)
        y_ref = layer_norm_ref(x.double(), weight.double(), bias.double(), eps)
        y_eager = layer_norm_ref(x, weight, bias, eps, upcast=False)
    assert y.data_ptr() == out.data_ptr()
    check_rule(y, y_ref, dtype, y_eager, what)


def sr_raw_weights(g, C, R):
    """Random fp64 weights of one SR attention (nn.Linear / nn.Conv2d layouts), SR LayerNorm affine off 1/0."""
    linears = []
    for _ in range(4):
        linears += [randn(g, C, C, scale=C**-0.5), randn(g, C, scale=0.5)]
    if R > 1:
        sr = [randn(g, C, C, R, R, scale=(C * R * R) ** -0.5), randn(g, C, scale=0.5),
              randn(g, C, scale=0.3, shift=1.0), randn(g, C, scale=0.3)]
    else:
        sr = [None] * 4
    return linears + sr


@prop(12)
@given(
    stage=st.sampled_from(STAGES), B=st.integers(1, 2), dH=st.integers(0, 11), dW=st.integers(0, 11),
    dtype=st.sampled_from(DTYPES), with_residual=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_sr_attention_kernel(stage, B, dH, dW, dtype, with_residual, seed):
    from segformer_fast.kernels.sr_attention import sr_attention, sr_attention_ref
    from segformer_fast.prepared.weights import prepare_sr_attention_params

    C, heads, R = stage
    H, W = R + dH, R + dW  # the kernel needs H, W >= R (at least one reduced token)
    B = 1 if C >= WIDE else B
    note(f"ran with B={B}, H={H}, W={W}")
    g = torch.Generator().manual_seed(seed)
    weights = sr_raw_weights(g, C, R)
    params64 = prepare_sr_attention_params(*weights, 1e-5, heads, dtype=torch.float64)
    params = prepare_sr_attention_params(*weights, 1e-5, heads, dtype=dtype)
    x = randn(g, B, H * W, C, dtype=dtype)
    residual = randn(g, B, H * W, C, dtype=dtype) if with_residual else None
    out = poison_(torch.empty_like(x))
    y = sr_attention(x, residual, H, W, params, out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = sr_attention_ref(x.double(), None if residual is None else residual.double(), H, W, params64)
    eager = sr_attention_ref(x, residual, H, W, params, upcast=False)
    check_rule(y, ref, dtype, eager, f"sr_attention C={C} heads={heads} R={R} B={B} H={H} W={W} {dtype}")


@prop(10)
@given(
    C=st.sampled_from(WIDTHS), B=st.integers(1, 2), H=st.integers(1, 9), W=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES), with_residual=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_mixffn_kernel(C, B, H, W, dtype, with_residual, seed):
    from segformer_fast.kernels.mixffn import mixffn, mixffn_ref
    from segformer_fast.prepared.weights import prepare_mixffn_params

    if C >= WIDE:  # keep the interpreter to one 64-token M block for the 1280/2048-wide hidden layers
        B, H, W = 1, min(H, 8), min(W, 8)
    note(f"ran with B={B}, H={H}, W={W}")
    C4 = 4 * C
    g = torch.Generator().manual_seed(seed)
    raw = (randn(g, C4, C, scale=C**-0.5), randn(g, C4, scale=0.5), randn(g, C4, 1, 3, 3, scale=1 / 3),
           randn(g, C4, scale=0.5), randn(g, C, C4, scale=C4**-0.5), randn(g, C, scale=0.5))
    params64 = prepare_mixffn_params(*raw, dtype=torch.float64)
    params = prepare_mixffn_params(*raw, dtype=dtype)
    x = randn(g, B, H * W, C, dtype=dtype)
    residual = randn(g, B, H * W, C, dtype=dtype) if with_residual else None
    out = poison_(torch.empty_like(x))
    y = mixffn(x, H, W, params, residual=residual, out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = mixffn_ref(x.double(), H, W, params64, residual=None if residual is None else residual.double())
    eager = mixffn_ref(x, H, W, params, residual=residual, upcast=False)
    check_rule(y, ref, dtype, eager, f"mixffn C={C} B={B} H={H} W={W} {dtype}")


# ------------------------------------------------------------------------------------------ C++ decoder ops
def stage_sizes(height, width):
    """Stage grids of an H x W image, as the model computes them: ceil(H/4), then ceil(h/2) per stage."""
    sizes = [(math.ceil(height / 4), math.ceil(width / 4))]
    for _ in range(3):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def fused_decode_fp64(p1, p2, p3, p4, bias, cls_weight, cls_bias):
    """ops.fused_decode_eager's formula in fp64 (the eager op itself computes in fp32 and rejects fp64 inputs)."""
    size = p1.shape[1:3]
    hidden = p1.double() + bias.double()
    for p in (p2, p3, p4):
        image = p.double().permute(0, 3, 1, 2)
        if image.shape[2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        hidden = hidden + image.permute(0, 2, 3, 1)
    logits = torch.relu(hidden) @ cls_weight.double().t() + cls_bias.double()
    return logits.permute(0, 3, 1, 2).contiguous()


@prop(20)
@given(
    H=st.integers(1, 300), W=st.integers(1, 300), B=st.integers(1, 2), D=st.sampled_from([256, 768]),
    K=st.integers(1, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
)
def test_fused_decode_matches_fp64(H, W, B, D, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    maps = [randn(g, B, h, w, D, dtype=dtype) for h, w in stage_sizes(H, W)]
    bias = randn(g, D, scale=0.5, dtype=dtype)
    cls_weight = randn(g, K, D, scale=D**-0.5, dtype=dtype)
    cls_bias = randn(g, K, scale=0.5, dtype=dtype)
    args = (*maps, bias, cls_weight, cls_bias)
    got = ops.fused_decode(*args)
    assert got.is_contiguous()
    ref = fused_decode_fp64(*args)
    eager = ops.fused_decode_eager(*args)
    check_rule(got, ref, dtype, eager, f"fused_decode image {H}x{W} B={B} D={D} K={K} {dtype}")


#: Labels may differ from F.interpolate(...).argmax(1) only where the two largest upsampled values are within
#: this fraction of the image's largest |logit| (the scale the bilinear arithmetic rounds at): a near-tie that a
#: different but equally exact summation order may break the other way.
NEAR_TIE = 1e-6


@prop(25)
@given(
    K=st.integers(1, 40), h=st.integers(1, 20), w=st.integers(1, 20), H=st.integers(1, 300), W=st.integers(1, 300),
    B=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
)
def test_upsample_argmax_matches_interpolate_argmax(K, h, w, H, W, B, seed):
    g = torch.Generator().manual_seed(seed)
    logits = randn(g, B, K, h, w, scale=3.0, dtype=torch.float32)
    labels = ops.upsample_argmax(logits, H, W)
    assert labels.dtype == torch.int64 and labels.shape == (B, H, W)
    upsampled = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    expected = upsampled.argmax(1)
    if K == 1:
        assert (labels == 0).all()
        return
    top2 = upsampled.topk(2, dim=1).values
    scale = logits.abs().amax(dim=(1, 2, 3)).view(B, 1, 1)
    decided = (top2[:, 0] - top2[:, 1]) > NEAR_TIE * scale
    mismatched = (labels != expected) & decided
    assert not mismatched.any(), (
        f"upsample_argmax {B}x{K}x{h}x{w} -> {H}x{W}: {int(mismatched.sum())} labels differ from "
        f"F.interpolate(...).argmax(1) away from near-ties, first at {mismatched.nonzero()[0].tolist()}"
    )


# ------------------------------------------------------------------------------------- engine vs reference
@functools.lru_cache(maxsize=6)
def b0_reference(num_labels, seed):
    return Segformer.from_config("b0", num_labels=num_labels, seed=seed)


@functools.lru_cache(maxsize=6)
def b0_engine(num_labels, seed, kernels):
    # verify=False: each property checks the engine against the reference itself
    return optimize(b0_reference(num_labels, seed), kernels=kernels, verify=False)


def assert_relative(got, expected, rtol, what):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: the reference is not finite"
    error = max_abs_error(got, expected)
    scale = float(expected.abs().max())
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:g} x max |ref| {scale:.3e}"


@prop(12)
@given(
    B=st.integers(1, 2), H=st.integers(1, 300), W=st.integers(1, 300), K=st.integers(1, 40),
    model_seed=st.integers(0, 2), seed=st.integers(0, 2**31 - 1),
)
def test_torch_engine_matches_reference_any_size(B, H, W, K, model_seed, seed):
    """Covers H, W < 32 too, where some stage grid is smaller than its SR ratio and the SR conv sees it zero-padded."""
    reference = b0_reference(K, model_seed)
    engine = b0_engine(K, model_seed, "torch")
    pixels = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(pixels)
    got = engine(pixels)
    assert got.dtype == torch.float32
    assert_relative(got, expected, 1e-5, f"torch engine B={B} {H}x{W} K={K}")


@prop(3)
@given(B=st.integers(1, 2), H=st.integers(32, 72), W=st.integers(32, 72), seed=st.integers(0, 2**31 - 1))
def test_triton_engine_matches_reference_small_sizes(B, H, W, seed):
    """At 32..72 pixels every stage grid is >= its SR ratio, so every block runs the Triton kernels."""
    from segformer_fast.kernels import layernorm, mixffn, sr_attention

    reference = b0_reference(13, 0)
    engine = b0_engine(13, 0, "triton")
    pixels = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(pixels)
    with (counting_calls(layernorm, "layer_norm") as norm_calls, counting_calls(sr_attention, "sr_attention") as
          attention_calls, counting_calls(mixffn, "mixffn") as mixffn_calls):
        got = engine(pixels)
    assert attention_calls["sr_attention"] and norm_calls["layer_norm"] and mixffn_calls["mixffn"]
    assert torch.isfinite(got).all()
    assert_within_tolerance(got, expected, torch.float32, what=f"triton engine B={B} {H}x{W}")


# ------------------------------------------------------------------------------------------ reference model
@prop(10)
@given(B=st.integers(1, 2), H=st.integers(1, 300), W=st.integers(1, 300), K=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_reference_output_shape_any_size(B, H, W, K, seed):
    reference = b0_reference(K, 1)
    pixels = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = reference(pixels)
    assert logits.shape == (B, K, math.ceil(H / 4), math.ceil(W / 4))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("H, W", [(1, 1), (3, 300), (300, 2), (29, 31)])
def test_reference_shape_extremes(H, W):
    """Degenerate grids that random draws rarely hit: 1-pixel images and 1-row stripes."""
    reference = b0_reference(5, 1)
    pixels = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(H * 1000 + W))
    with torch.no_grad():
        logits = reference(pixels)
    assert logits.shape == (1, 5, math.ceil(H / 4), math.ceil(W / 4))
    assert torch.isfinite(logits).all()
    assert_relative(b0_engine(5, 1, "torch")(pixels), logits, 1e-5, f"torch engine {H}x{W}")


# ------------------------------------------------------------------ processing sizes and mmseg metrics
@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    short_side=st.sampled_from([512, 640, 768, 1024]),
    divisor=st.sampled_from([1, 16, 32]),
)
def test_keep_ratio_size_properties(height, width, short_side, divisor):
    new_h, new_w = output_size(height, width, short_side=short_side, max_long_side=2048, size_divisor=None)
    scale = min(2048 / max(height, width), short_side / min(height, width))
    assert new_h == max(1, math.floor(height * scale + 0.5)) and new_w == max(1, math.floor(width * scale + 0.5))
    assert min(new_h, new_w) <= short_side and max(new_h, new_w) <= 2048
    assert min(new_h, new_w) == short_side or max(new_h, new_w) == 2048 or min(new_h, new_w) == 1
    aligned = output_size(height, width, short_side=short_side, max_long_side=2048, size_divisor=divisor)
    assert aligned[0] % divisor == 0 and aligned[1] % divisor == 0
    assert 0 <= aligned[0] - new_h < divisor and 0 <= aligned[1] - new_w < divisor


def _confusion_metrics(preds, labels, k, ignore=255):
    """Independent implementation: a k x k confusion matrix (rows: label, columns: prediction) via np.bincount."""
    conf = np.zeros((k, k), dtype=np.int64)
    for p, lab in zip(preds, labels):
        keep = lab.ravel() != ignore
        conf += np.bincount(lab.ravel()[keep] * k + p.ravel()[keep], minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    iou = [tp[c] / union[c] if union[c] else np.nan for c in range(k)]
    acc = [tp[c] / conf[c].sum() if conf[c].sum() else np.nan for c in range(k)]
    return np.array(iou), np.array(acc), tp.sum() / conf.sum()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12), n=st.integers(1, 4), ignore_frac=st.floats(0, 0.6))
def test_matches_a_confusion_matrix_implementation(seed, k, n, ignore_frac):
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(n):
        shape = tuple(rng.integers(1, 20, 2))
        # labels use only some classes so that empty classes occur
        used = rng.choice(k, size=rng.integers(1, k + 1), replace=False)
        labels.append(np.where(rng.random(shape) < ignore_frac, 255, rng.choice(used, shape)).astype(np.uint8))
        preds.append(rng.integers(0, k, shape))
    acc = MetricAccumulator(k)
    for p, lab in zip(preds, labels):
        acc.update(p, lab)
    m = acc.compute()
    iou, cls_acc, a_acc = _confusion_metrics(preds, labels, k)
    np.testing.assert_allclose(m["IoU"], iou, equal_nan=True)
    np.testing.assert_allclose(m["Acc"], cls_acc, equal_nan=True)
    if np.isnan(iou).all():
        assert math.isnan(m["mIoU"])
    else:
        assert m["mIoU"] == pytest.approx(np.nanmean(iou))
        assert m["mAcc"] == pytest.approx(np.nanmean(cls_acc))
        assert m["aAcc"] == pytest.approx(a_acc)
