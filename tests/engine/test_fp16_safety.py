"""Robustness of the engine and its ops: fp16 overflow, NaN/Inf inputs, the input contract, concurrent calls.

- fp16 overflow (docs/DESIGN.md section 5): SegFormer deployments in fp16 overflow in LayerNorm when activations are
  large (TensorRT users see logits clipped at +-512). A B0 whose stage-1 patch-embed conv is scaled up makes the
  tokens reach ~1e4, where x**2 (and so a naive fp16 variance) overflows fp16's 65504; the Triton LayerNorm and the
  engine must stay finite and within the tolerance rule of the fp32 reference.
- NaN/Inf inputs: every call returns; NaN propagates as the reference's does.
- The input contract at the engine boundary: wrong rank, channels, dtype, device, an empty batch.
- Concurrency: one engine called from several threads gives every caller the reference's result.
"""

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.core.numerics import max_abs_error, tolerance
from segformer_fast.engine.engine import optimize
from segformer_fast.model.segformer import Segformer
from segformer_fast.ops import extension as ops

from helpers import assert_within_tolerance, counting_calls, poison_

FP16_MAX = torch.finfo(torch.float16).max  # 65504
#: Scale of the stage-1 patch-embed conv: conv outputs of std ~2e3 and max ~1e4 on a unit-normal image.
PATCH_SCALE = 5e3
IMAGE = (1, 3, 36, 44)


def _cpu_half_dtype():
    """fp16 when the CPU ops the torch engine uses (conv2d, depthwise conv2d, SDPA, layer_norm) run in fp16 on
    this torch build (they do on torch >= 2.1), else bf16."""
    try:
        x = torch.randn(1, 4, 5, 5, dtype=torch.float16)
        F.conv2d(x, torch.randn(4, 1, 3, 3, dtype=torch.float16), padding=1, groups=4)
        F.conv2d(x, torch.randn(4, 4, 2, 2, dtype=torch.float16), stride=2)
        q = torch.randn(1, 1, 3, 8, dtype=torch.float16)
        F.scaled_dot_product_attention(q, q, q)
        F.layer_norm(x, (5,))
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


HALF = _cpu_half_dtype()


def call_returns(fn, *args, seconds=300):
    """fn(*args) on a worker thread (under no_grad); fail if it has not returned within ``seconds``."""
    result = {}

    def target():
        try:
            with torch.no_grad():
                result["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001  (re-raised below on the test's thread)
            result["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


# -------------------------------------------------------------------------------------------- fp16 overflow
@pytest.fixture(scope="module")
def loud_model():
    """B0 whose stage-1 patch-embed conv (weight and bias) is scaled by PATCH_SCALE, with the tokens it makes."""
    model = Segformer.from_config("b0", num_labels=8, seed=3)
    with torch.no_grad():
        model.stages[0].patch_embed.proj.weight.mul_(PATCH_SCALE)
        model.stages[0].patch_embed.proj.bias.mul_(PATCH_SCALE)
    pixels = torch.randn(*IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.stages[0].patch_embed.proj(pixels)  # (1, 32, 9, 11), fp32
    return model, pixels, features


def naive_fp16_layer_norm(x, weight, bias, eps):
    """LayerNorm as an fp16 graph without fp32 statistics computes it: E[x²] - E[x]² in fp16."""
    mean = x.mean(-1, keepdim=True)
    var = x.pow(2).mean(-1, keepdim=True) - mean.pow(2)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias, var


def test_large_activations_overflow_a_naive_fp16_layer_norm(loud_model):
    """The case is really dangerous: the tokens fit fp16, their squares do not, and a naive fp16 LN breaks."""
    model, _, features = loud_model
    tokens = features.flatten(2).transpose(1, 2)
    peak = float(tokens.abs().max())
    assert 1e3 <= peak < FP16_MAX / 2, f"stage-1 tokens peak at {peak:.3e}, expected 1e3..3e4"
    assert float(tokens.pow(2).sum(-1).max()) > FP16_MAX, "the sum of squares must overflow fp16"
    norm = model.stages[0].patch_embed.norm
    half = tokens.half()
    assert torch.isfinite(half).all(), "the tokens themselves must be representable in fp16"
    naive, var = naive_fp16_layer_norm(half, norm.weight.half(), norm.bias.half(), norm.eps)
    assert not torch.isfinite(var).all(), "the naive fp16 variance should overflow"
    with torch.no_grad():
        reference = F.layer_norm(tokens.double(), (tokens.shape[-1],), norm.weight.double(), norm.bias.double(),
                                 norm.eps)
    error = max_abs_error(naive.float(), reference)
    assert error > tolerance(reference, torch.float16), f"the naive fp16 LN is unexpectedly accurate ({error:.3e})"


def test_triton_layer_norm_fp16_survives_large_activations(loud_model):
    from segformer_fast.kernels.layernorm import (
        layer_norm,
        layer_norm_ref,
        patch_embed_layer_norm,
        patch_embed_layer_norm_ref,
    )

    model, _, features = loud_model
    norm = model.stages[0].patch_embed.norm
    weight, bias = norm.weight.detach().half(), norm.bias.detach().half()
    features16 = features.half().contiguous()
    tokens16 = features16.flatten(2).transpose(1, 2).contiguous()

    y = layer_norm(tokens16, weight, bias, norm.eps, out=poison_(torch.empty_like(tokens16)))
    reference = layer_norm_ref(tokens16.double(), weight.double(), bias.double(), norm.eps)
    eager = layer_norm_ref(tokens16, weight, bias, norm.eps, upcast=False)
    assert torch.isfinite(eager).all(), "eager fp16 layer_norm overflowed: the rule would be vacuous"
    assert torch.isfinite(y).all(), "Triton fp16 layer_norm overflowed on 1e4-magnitude tokens"
    assert_within_tolerance(y, reference, torch.float16, eager=eager, what="layer_norm fp16 on ~1e4 tokens")

    y = patch_embed_layer_norm(features16, weight, bias, norm.eps)
    reference = patch_embed_layer_norm_ref(features16.double(), weight.double(), bias.double(), norm.eps)
    eager = patch_embed_layer_norm_ref(features16, weight, bias, norm.eps, upcast=False)
    assert torch.isfinite(y).all(), "Triton fp16 patch_embed_layer_norm overflowed on 1e4-magnitude features"
    assert_within_tolerance(y, reference, torch.float16, eager=eager, what="patch_embed_layer_norm fp16")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_half_engine_survives_large_activations(loud_model, kernels):
    """The engine in fp16 (bf16 if this torch has no CPU fp16 ops) against the fp32 reference, eager = the
    reference run in the same dtype. "triton" runs the Triton kernels in the interpreter (about 4 s)."""
    model, pixels, _ = loud_model
    engine = optimize(model, kernels=kernels, dtype=HALF, verify=False)
    with torch.no_grad():
        expected = model(pixels)
        eager = copy.deepcopy(model).to(HALF)(pixels.to(HALF))
    got = engine(pixels)
    assert got.dtype == HALF
    assert torch.isfinite(eager).all(), f"the eager {HALF} reference overflowed: the rule would be vacuous"
    assert torch.isfinite(got).all(), f"{kernels} engine in {HALF} gave non-finite logits on large activations"
    assert_within_tolerance(got, expected, HALF, eager=eager, what=f"{kernels} engine {HALF}, tokens ~1e4")


# ------------------------------------------------------------------------------------------ NaN / Inf inputs
@pytest.fixture(scope="module")
def small_model():
    return Segformer.from_config("b0", num_labels=5, seed=1)


def poisoned_pixels(value, shape=(1, 3, 32, 32)):
    pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    pixels[0, 1, 5, 7] = value
    return pixels


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_reference_propagates_nan_everywhere(small_model, value):
    """One bad pixel makes every logit NaN in the reference: the stage-1 conv spreads it to a few tokens, their
    LayerNorm gives NaN (inf - inf), the SR conv puts NaN into a key/value token every query attends to, and from
    there every token of every later stage is NaN. (An image with a NaN pixel has no meaningful segmentation.)"""
    logits = call_returns(small_model, poisoned_pixels(value))
    assert logits.shape == (1, 5, 8, 8)
    assert logits.isnan().all()


def test_eager_engine_propagates_nan_like_reference(small_model):
    """kernels="eager" (torch.relu in the decoder) keeps the NaN: the encoder of the engine propagates it."""
    engine = optimize(small_model, kernels="eager", verify=False)
    logits = call_returns(engine, poisoned_pixels(float("nan")))
    assert logits.isnan().all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_torch_engine_propagates_nan_like_reference(small_model, value):
    engine = optimize(small_model, kernels="torch", verify=False)
    logits = call_returns(engine, poisoned_pixels(value))
    assert logits.shape == (1, 5, 8, 8)
    assert logits.isnan().all(), (
        f"{int((~logits.isnan()).sum())} of {logits.numel()} logits are finite for an input with a {value} pixel "
        f"(the reference's are all NaN); logits[0, :, 0, 0] = {logits[0, :, 0, 0].tolist()}"
    )


def test_triton_engine_propagates_nan_like_reference(small_model):
    from segformer_fast.kernels import sr_attention

    engine = optimize(small_model, kernels="triton", verify=False)
    with counting_calls(sr_attention, "sr_attention") as calls:
        logits = call_returns(engine, poisoned_pixels(float("nan")))
    assert calls["sr_attention"] > 0
    assert logits.isnan().all(), f"{int((~logits.isnan()).sum())} of {logits.numel()} logits are finite"


def decode_inputs(D=16, K=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    maps = [torch.randn(1, h, w, D, generator=g).to(dtype) for h, w in [(8, 8), (4, 4), (2, 2), (1, 1)]]
    return maps, torch.randn(D, generator=g).to(dtype), torch.randn(K, D, generator=g).to(dtype), \
        torch.randn(K, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1])
def test_fused_decode_propagates_nan_like_eager(stage, dtype):
    """A NaN in one channel of one pixel of p1 (or p2): eager gives NaN at the output pixels that read it."""
    maps, bias, cls_weight, cls_bias = decode_inputs(dtype=dtype)
    maps[stage][0, 1, 2, 3] = float("nan")
    got = call_returns(ops.fused_decode, *maps, bias, cls_weight, cls_bias)
    expected = ops.fused_decode_eager(*maps, bias, cls_weight, cls_bias)
    assert expected.isnan().any()
    assert torch.equal(got.isnan(), expected.isnan()), (
        f"fused_decode: {int(got.isnan().sum())} NaN logits, eager: {int(expected.isnan().sum())}"
    )


@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_fused_decode_propagates_inf_like_eager(value):
    """+inf survives the ReLU (-inf becomes 0): the non-finite pattern and the finite values match eager."""
    maps, bias, cls_weight, cls_bias = decode_inputs()
    maps[0][0, 1, 2, 3] = value
    got = call_returns(ops.fused_decode, *maps, bias, cls_weight, cls_bias)
    expected = ops.fused_decode_eager(*maps, bias, cls_weight, cls_bias)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got[got.isinf()], expected[expected.isinf()])
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape, size", [((2, 4, 3, 3), (10, 10)), ((2, 3, 5, 4), (17, 9)), ((2, 6, 1, 1), (5, 5))])
def test_upsample_argmax_non_finite_like_torch(value, shape, size):
    """Labels equal F.interpolate(...).argmax(1) bit for bit with non-finite logits too: torch.argmax counts NaN as
    the maximum, and inf * 0-weight taps make NaN in both (so an inf logit can win pixels it has no weight at)."""
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    logits[0, 1, shape[2] // 2, shape[3] // 2] = value
    logits[1, 2, 0, 0] = value
    labels = call_returns(ops.upsample_argmax, logits, *size)
    expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(labels, expected)


def test_upsample_argmax_all_nan_gives_label_zero():
    labels = call_returns(ops.upsample_argmax, torch.full((1, 4, 3, 3), float("nan")), 7, 5)
    assert labels.shape == (1, 7, 5) and (labels == 0).all()


# --------------------------------------------------------------------------------------- the input contract
@pytest.fixture(scope="module")
def engine(small_model):
    return optimize(small_model, kernels="torch")  # verify=True: checked against the reference once here


@pytest.mark.parametrize("pixels, error, fragments", [
    (torch.randn(3, 32, 32), ValueError, ["(B, 3, H, W)", "3-D", "(3, 32, 32)", "unsqueeze(0)"]),
    (torch.randn(32, 32), ValueError, ["(B, 3, H, W)", "2-D", "(32, 32)"]),
    (torch.randn(1, 4, 32, 32), ValueError, ["3 channels", "(1, 4, 32, 32)"]),
    (torch.randn(1, 1, 32, 32), ValueError, ["3 channels", "(1, 1, 32, 32)"]),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, ["floating", "torch.uint8"]),
    (torch.randint(0, 255, (1, 3, 32, 32)), TypeError, ["floating", "torch.int64"]),
    (torch.ones(1, 3, 32, 32, dtype=torch.bool), TypeError, ["floating", "torch.bool"]),
    (torch.randn(1, 3, 32, 32, device="meta"), ValueError, ["meta", "cpu"]),
    (torch.randn(1, 3, 0, 32), ValueError, ["H, W >= 1", "(1, 3, 0, 32)"]),
    ([[0.0]], TypeError, ["torch.Tensor", "list"]),
], ids=["3d", "2d", "4-channels", "1-channel", "uint8", "int64", "bool", "meta", "zero-height", "list"])
def test_engine_input_contract(engine, pixels, error, fragments):
    for call in (engine, engine.logits):
        with pytest.raises(error) as info:
            call(pixels)
        message = str(info.value)
        missing = [fragment for fragment in fragments if fragment not in message]
        assert not missing, f"message {message!r} lacks {missing}"


@pytest.mark.parametrize("height, width", [(37, 50), (1, 1), (64, 3)])
def test_engine_empty_batch(engine, small_model, height, width):
    logits = engine(torch.empty(0, 3, height, width))
    assert logits.shape == (0, 5, math.ceil(height / 4), math.ceil(width / 4))
    assert logits.dtype == torch.float32
    with torch.no_grad():
        assert small_model(torch.empty(0, 3, height, width)).shape == logits.shape


def test_half_engine_empty_batch_casts(small_model):
    engine = optimize(small_model, kernels="torch", dtype=torch.bfloat16, verify=False)
    logits = engine(torch.empty(0, 3, 30, 41))
    assert logits.shape == (0, 5, 8, 11) and logits.dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------- concurrency
def test_engine_concurrent_calls_match_reference(engine, small_model):
    """4 threads x 3 calls on one engine, every call a different input size; each equals the reference."""
    generator = torch.Generator().manual_seed(13)
    jobs = [[torch.randn(1 + (t + c) % 2, 3, 29 + 11 * t + 5 * c, 70 - 9 * t + 4 * c, generator=generator)
             for c in range(3)] for t in range(4)]
    with torch.no_grad():
        expected = [[small_model(pixels) for pixels in thread_jobs] for thread_jobs in jobs]
    results = [[None] * 3 for _ in range(4)]
    errors = []
    barrier = threading.Barrier(4)

    def worker(t):
        try:
            barrier.wait(timeout=60)
            for c, pixels in enumerate(jobs[t]):
                results[t][c] = engine(pixels)
        except BaseException as error:  # noqa: BLE001  (reported on the test's thread)
            errors.append((t, error))

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "a worker did not finish within 300 s"
    assert not errors, f"worker errors: {errors}"
    for t in range(4):
        for c in range(3):
            got, want = results[t][c], expected[t][c]
            assert got.shape == want.shape, f"thread {t} call {c}: shape {tuple(got.shape)} != {tuple(want.shape)}"
            error = max_abs_error(got, want)
            assert error <= 1e-5 * float(want.abs().max()), f"thread {t} call {c}: max abs error {error:.3e}"
