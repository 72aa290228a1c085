"""Python entry points of the ``segformer_fast._C`` ops (the CPU encoder ops, the decoder ops on CPU and CUDA), with
fake impls and eager fallbacks.

- :func:`fused_decode`: four projected stage maps (channels-last) -> decoder logits, the bilinear upsampling, sum,
  folded bias, ReLU and classifier fused (see :mod:`segformer_fast.prepared.decoder_fold`).
- :func:`fused_decode_tokens`: the same with the stage-1 map projected from the stage-1 tokens inside the op, per
  block of rows, so that map is never written (a CPU kernel only).
- :func:`upsample_argmax`: logits -> full-resolution labels, bilinear upsampling and argmax fused.
- :func:`slide_argmax`: the label pass of sliding-window inference (windows' logits -> averaged, resized, arg-maxed
  rows of labels) in one pass per block of rows (a CPU kernel only).
- :func:`kv_attention`: softmax(q kᵀ) v per head over SR attention's merged k/v, the scores never written (a CPU
  kernel only: on CUDA the Triton flash SR-attention kernel does this).
- :func:`layer_norm`: LayerNorm over the channels of token rows, fp32 statistics (a CPU kernel only: on CUDA the
  Triton LayerNorm kernel does this).

When the extension is built the functions call ``torch.ops.segformer_fast.*`` (CPU kernels always, CUDA kernels
when built with CUDA). Otherwise, or for a device the build has no kernel for, they run an eager PyTorch fallback
with the same semantics and warn once, naming why. Fake implementations registered here let torch.compile and
torch.export trace the ops.
"""

import warnings

import torch

from segformer_fast.core.runtime import COMPUTE_DTYPES as _SUPPORTED_DTYPES
from segformer_fast.ops import cpu, reference

_MAP_NAMES = ("p1", "p2", "p3", "p4")

try:
    from segformer_fast import _C  # noqa: F401  (loading the library registers torch.ops.segformer_fast)

    _EXTENSION_ERROR = None
except ImportError as error:  # not built (SEGFORMER_FAST_SKIP_EXT=1) or built against another torch
    _EXTENSION_ERROR = error

_warned = False


def extension_available() -> bool:
    """True when ``segformer_fast._C`` is loaded and ``torch.ops.segformer_fast`` has the decoder ops."""
    return _EXTENSION_ERROR is None


def _kernel_devices() -> dict:
    """{op name: device types with a compiled kernel}, computed once (plain lookups keep torch.compile tracing)."""
    devices = {name: frozenset() for name in ("fused_decode", "fused_decode_tokens", "upsample_argmax", "kv_attention",
                                                 "layer_norm", "slide_argmax")}
    if _EXTENSION_ERROR is None:
        for op_name in devices:
            devices[op_name] = frozenset(
                device_type
                for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"segformer_fast::{op_name}", key)
            )
    return devices


_KERNEL_DEVICES = _kernel_devices()


def _has_kernel(op_name: str, device: torch.device) -> bool:
    return device.type in _KERNEL_DEVICES[op_name]


def _warn_fallback(op_name: str, device: torch.device) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    if not extension_available():
        why = f"the C++ extension segformer_fast._C could not be loaded ({_EXTENSION_ERROR})"
    else:
        why = f"segformer_fast._C was built without {device.type.upper()} kernels"
    warnings.warn(
        f"segformer_fast: {why}; {op_name} and the other decoder ops run their slower eager PyTorch fallbacks. "
        "Rebuild with `python setup.py build_ext --inplace` to get the fused kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_fused_decode(maps, bias, cls_weight, cls_bias) -> None:
    """The checks of csrc/checks.h, with the same messages (used by the fake impl and the eager fallback)."""
    for name, p in zip(_MAP_NAMES, maps):
        if p.dim() != 4:
            raise RuntimeError(
                f"fused_decode: {name} must be a 4-D channels-last (B, h, w, D) map, got a {p.dim()}-D tensor of "
                f"shape {list(p.shape)}"
            )
    p1 = maps[0]
    batch, dim = p1.shape[0], p1.shape[3]
    for name, p in zip(_MAP_NAMES, maps):
        if p.shape[3] != dim:
            raise RuntimeError(
                f"fused_decode: channel mismatch: {name} has D={p.shape[3]} channels (shape {list(p.shape)}) but p1 "
                f"has D={dim}"
            )
        if p.shape[0] != batch:
            raise RuntimeError(f"fused_decode: batch mismatch: {name} has B={p.shape[0]} but p1 has B={batch}")
    if bias.dim() != 1 or bias.shape[0] != dim:
        raise RuntimeError(f"fused_decode: bias must have shape (D,) = ({dim},), got {list(bias.shape)}")
    if cls_weight.dim() != 2:
        raise RuntimeError(
            f"fused_decode: cls_weight must be 2-D (K, D), got a {cls_weight.dim()}-D tensor of shape "
            f"{list(cls_weight.shape)}"
        )
    if cls_weight.shape[1] != dim:
        raise RuntimeError(
            f"fused_decode: channel mismatch: cls_weight has shape {list(cls_weight.shape)}, expected (K, D) with "
            f"D={dim} as in p1"
        )
    if cls_bias.dim() != 1 or cls_bias.shape[0] != cls_weight.shape[0]:
        raise RuntimeError(
            f"fused_decode: cls_bias must have shape (K,) = ({cls_weight.shape[0]},), got {list(cls_bias.shape)}"
        )
    if p1.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"fused_decode: expected float32, float16 or bfloat16 inputs, got p1 of dtype {p1.dtype}")
    named = list(zip(_MAP_NAMES, maps)) + [("bias", bias), ("cls_weight", cls_weight), ("cls_bias", cls_bias)]
    for name, tensor in named:
        if tensor.dtype != p1.dtype:
            raise RuntimeError(
                f"fused_decode: dtype mismatch: {name} is {tensor.dtype} but p1 is {p1.dtype}; cast all inputs to "
                "one dtype"
            )
        if tensor.device != p1.device:
            raise RuntimeError(
                f"fused_decode: device mismatch: {name} is on {tensor.device} but p1 is on {p1.device}"
            )
        if not tensor.is_contiguous():
            raise RuntimeError(
                f"fused_decode: {name} must be contiguous (p_i in channels-last (B, h, w, D) layout), got shape "
                f"{list(tensor.shape)} with strides {list(tensor.stride())}; call .contiguous()"
            )


def _check_upsample_argmax(logits, height, width) -> None:
    if logits.dim() != 4:
        raise RuntimeError(
            f"upsample_argmax: logits must be 4-D (B, K, h, w), got a {logits.dim()}-D tensor of shape "
            f"{list(logits.shape)}"
        )
    if height <= 0 or width <= 0:
        raise RuntimeError(f"upsample_argmax: output size must be positive, got ({height}, {width})")
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"upsample_argmax: expected float32, float16 or bfloat16 logits, got {logits.dtype}")
    if not logits.is_contiguous():
        raise RuntimeError(
            f"upsample_argmax: logits must be contiguous (B, K, h, w), got strides {list(logits.stride())} for "
            f"shape {list(logits.shape)}; call .contiguous()"
        )


if extension_available():

    @torch.library.register_fake("segformer_fast::fused_decode")
    def _fused_decode_fake(p1, p2, p3, p4, bias, cls_weight, cls_bias):
        _check_fused_decode((p1, p2, p3, p4), bias, cls_weight, cls_bias)
        return p1.new_empty((p1.shape[0], cls_weight.shape[0], p1.shape[1], p1.shape[2]))

    @torch.library.register_fake("segformer_fast::upsample_argmax")
    def _upsample_argmax_fake(logits, height, width):
        _check_upsample_argmax(logits, height, width)
        return logits.new_empty((logits.shape[0], height, width), dtype=torch.int64)


def _check_kv_attention(q, kv, heads) -> None:
    """The checks of csrc/kv_attention_cpu.cpp, with the same messages (used by the fake impl)."""
    if q.dim() != 3:
        raise RuntimeError(f"kv_attention: q must be 3-D (B, N, C), got a {q.dim()}-D tensor of shape {list(q.shape)}")
    if kv.dim() != 3:
        raise RuntimeError(
            f"kv_attention: kv must be 3-D (B, Nkv, 2C), got a {kv.dim()}-D tensor of shape {list(kv.shape)}"
        )
    batch, _, channels = q.shape
    if kv.shape[0] != batch or kv.shape[2] != 2 * channels:
        raise RuntimeError(
            f"kv_attention: kv must have shape (B, Nkv, 2C) = ({batch}, Nkv, {2 * channels}) for q of shape "
            f"{list(q.shape)}, got {list(kv.shape)}"
        )
    if kv.shape[1] < 1:
        raise RuntimeError(f"kv_attention: kv must have at least one token, got shape {list(kv.shape)}")
    if heads < 1 or channels % heads:
        raise RuntimeError(f"kv_attention: heads must divide C = {channels}, got {heads}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"kv_attention: expected float32, float16 or bfloat16 inputs, got {q.dtype}")
    if kv.dtype != q.dtype:
        raise RuntimeError(f"kv_attention: dtype mismatch: q is {q.dtype} but kv is {kv.dtype}")


if extension_available():

    @torch.library.register_fake("segformer_fast::kv_attention")
    def _kv_attention_fake(q, kv, heads):
        _check_kv_attention(q, kv, heads)
        return torch.empty_like(q)


def _check_fused_decode_tokens(t1, w1, maps, bias, cls_weight, cls_bias) -> None:
    """The checks of csrc/checks.h (check_fused_decode_tokens_inputs) for t1 and w1; the rest as fused_decode's with
    p1 standing for t1 w1ᵀ (used by the fake impl)."""
    if t1.dim() != 4:
        raise RuntimeError(f"fused_decode_tokens: t1 must be 4-D stage-1 tokens (B, h, w, C1), got a {t1.dim()}-D "
                           f"tensor of shape {list(t1.shape)}")
    if w1.dim() != 2 or w1.shape[1] != t1.shape[3]:
        raise RuntimeError(f"fused_decode_tokens: w1 must have shape (D, C1) with C1={t1.shape[3]} as in t1, got "
                           f"{list(w1.shape)}")
    if w1.dtype != t1.dtype:
        raise RuntimeError(f"fused_decode_tokens: dtype mismatch: w1 is {w1.dtype} but t1 is {t1.dtype}; cast all "
                           "inputs to one dtype")
    p1 = t1.new_empty((*t1.shape[:3], w1.shape[0]))
    _check_fused_decode((p1, *maps), bias, cls_weight, cls_bias)


def _is_channel_major(x) -> bool:
    """Whether x (B, N, C) is a contiguous (B, C, N) tensor transposed (csrc/layer_norm_cpu.cpp, is_channel_major)."""
    batch, tokens, channels = x.shape if x.dim() == 3 else (0, 0, 0)
    return (tokens > 1 and channels > 1 and x.stride(1) == 1 and x.stride(2) == tokens
            and (batch == 1 or x.stride(0) == tokens * channels))


def _check_layer_norm(x, weight, bias) -> None:
    """The checks of csrc/layer_norm_cpu.cpp, with the same messages (used by the fake impl)."""
    if x.dim() < 1:
        raise RuntimeError("layer_norm: x must have at least one dimension (..., C), got a 0-D tensor")
    channels = x.shape[-1]
    if channels < 1:
        raise RuntimeError(f"layer_norm: x must have C >= 1 channels in its last dimension, got shape {list(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"layer_norm: expected a float32, float16 or bfloat16 x, got {x.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor.dim() != 1 or tensor.shape[0] != channels:
            raise RuntimeError(f"layer_norm: {name} must have shape (C,) = ({channels},) for x of shape "
                               f"{list(x.shape)}, got {list(tensor.shape)}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise RuntimeError(f"layer_norm: dtype mismatch: x is {x.dtype} but weight is {weight.dtype} and bias is "
                           f"{bias.dtype}")
    if not (x.is_contiguous() or _is_channel_major(x)):
        raise RuntimeError(f"layer_norm: x must be contiguous, or (B, N, C) with strides (C*N, 1, N) (a (B, C, N) "
                           f"tensor transposed), got shape {list(x.shape)} and strides {list(x.stride())}; call "
                           ".contiguous()")


if extension_available():

    @torch.library.register_fake("segformer_fast::fused_decode_tokens")
    def _fused_decode_tokens_fake(t1, w1, p2, p3, p4, bias, cls_weight, cls_bias):
        _check_fused_decode_tokens(t1, w1, (p2, p3, p4), bias, cls_weight, cls_bias)
        return t1.new_empty((t1.shape[0], cls_weight.shape[0], t1.shape[1], t1.shape[2]))

    @torch.library.register_fake("segformer_fast::layer_norm")
    def _layer_norm_fake(x, weight, bias, eps):
        _check_layer_norm(x, weight, bias)
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def fused_decode_eager(p1, p2, p3, p4, bias, cls_weight, cls_bias) -> torch.Tensor:
    """Eager PyTorch version of :func:`fused_decode` (fp32 arithmetic, result in the inputs' dtype)."""
    _check_fused_decode((p1, p2, p3, p4), bias, cls_weight, cls_bias)
    return reference.fused_decode(p1, p2, p3, p4, bias, cls_weight, cls_bias)


def upsample_argmax_eager(logits, height: int, width: int) -> torch.Tensor:
    """Eager PyTorch version of :func:`upsample_argmax`: ``F.interpolate(...).argmax(1)`` in the logits' dtype."""
    _check_upsample_argmax(logits, height, width)
    return reference.upsample_argmax(logits, height, width)


def fused_decode(p1, p2, p3, p4, bias, cls_weight, cls_bias) -> torch.Tensor:
    """Fused decoder tail: logits = ReLU(sum_i up_i(P_i) + bias) W_cls^T + b_cls.

    p1..p4: (B, h_i, w_i, D) contiguous channels-last projected stage maps (p1 on the output grid); bias: (D,);
    cls_weight: (K, D); cls_bias: (K,); one dtype (float32, float16, bfloat16) and device for all.
    Returns logits (B, K, h_1, w_1) contiguous. up_i is bilinear resizing to (h_1, w_1) with align_corners=False,
    as ``F.interpolate(size=(h_1, w_1))``. Accumulation is fp32.
    """
    if _has_kernel("fused_decode", p1.device):
        return torch.ops.segformer_fast.fused_decode(p1, p2, p3, p4, bias, cls_weight, cls_bias)
    _warn_fallback("fused_decode", p1.device)
    return fused_decode_eager(p1, p2, p3, p4, bias, cls_weight, cls_bias)


def fused_decode_tokens(t1, w1, p2, p3, p4, bias, cls_weight, cls_bias) -> torch.Tensor:
    """:func:`fused_decode` with p1 = t1 w1ᵀ: t1 (B, h_1, w_1, C_1) the stage-1 tokens as a contiguous channels-last
    map, w1 (D, C_1) the stage's folded projection (a plain tensor); the rest as in :func:`fused_decode`.

    The extension's CPU kernel projects each block of output rows inside the op (one GEMM per block, in the
    tokens' dtype, as the projection written out would be), so the (B, h_1, w_1, D) map, the largest tensor of the
    decoder, is never written nor read back. Elsewhere, and while tracing: the projection, then
    :func:`fused_decode`."""
    if t1.device.type == "cpu" and not cpu.tracing() and _has_kernel("fused_decode_tokens", t1.device):
        return torch.ops.segformer_fast.fused_decode_tokens(t1, w1, p2, p3, p4, bias, cls_weight, cls_bias)
    return fused_decode(reference.linear(t1, w1), p2, p3, p4, bias, cls_weight, cls_bias)


def kv_attention(q, kv, heads: int) -> torch.Tensor:
    """softmax(q kᵀ) v per head: q (B, N, C) projected and scaled, kv (B, Nkv, 2C) = [k | v], ``heads`` splitting C
    head-major -> (B, N, C) in q's dtype, computed in fp32.

    The extension's CPU kernel where it is built (scores kept per block of query rows in a thread-local buffer);
    without it on CPU :func:`segformer_fast.ops.cpu.attention_by_row_chunks`; on other devices and while tracing
    :func:`segformer_fast.ops.reference.kv_attention`. CUDA has no kernel of its own here, by design: its SR
    attention is the Triton flash kernel.
    """
    if q.device.type == "cpu" and not cpu.tracing():
        if _has_kernel("kv_attention", q.device):
            return torch.ops.segformer_fast.kv_attention(q.contiguous(), kv.contiguous(), int(heads))
        _warn_fallback("kv_attention", q.device)
        return cpu.attention_by_row_chunks(q, kv, heads)
    return reference.kv_attention(q, kv, heads)


def layer_norm(tokens, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of tokens (..., C) with fp32 statistics, in the tokens' dtype, contiguous; weight,
    bias (C,).

    The extension's CPU kernel where it is built (rows normalized in AVX-512 registers; ATen's kernel is 1.3-3.9x
    slower at SegFormer's 32..512 channels: benchmarks/NOTES.md). It reads contiguous tokens and channel-major ones
    (B, N, C) with strides (C*N, 1, N), the NCHW patch-embed output flattened and transposed, without a copy; any
    other layout is made contiguous first. Elsewhere, and while tracing,
    :func:`segformer_fast.ops.reference.layer_norm` (``F.layer_norm``)."""
    if tokens.device.type == "cpu" and not cpu.tracing() and tokens.dtype in _SUPPORTED_DTYPES:
        if _has_kernel("layer_norm", tokens.device):
            if not (tokens.is_contiguous() or _is_channel_major(tokens)):
                tokens = tokens.contiguous()
            return torch.ops.segformer_fast.layer_norm(tokens, weight, bias, float(eps))
        _warn_fallback("layer_norm", tokens.device)
    return reference.layer_norm(tokens, weight, bias, eps)


def upsample_argmax(logits, height: int, width: int) -> torch.Tensor:
    """Labels (B, height, width) int64 = argmax over K of the bilinear (align_corners=False) upsampling of
    logits (B, K, h, w), without materializing the upsampled logits; ties pick the first index as torch.argmax."""
    if _has_kernel("upsample_argmax", logits.device):
        return torch.ops.segformer_fast.upsample_argmax(logits, int(height), int(width))
    _warn_fallback("upsample_argmax", logits.device)
    return upsample_argmax_eager(logits, int(height), int(width))


def slide_argmax_available(device) -> bool:
    """Whether :func:`slide_argmax` runs the extension's kernel on ``device`` (a CPU with the extension built)."""
    return _has_kernel("slide_argmax", torch.device(device))


def slide_argmax(window_logits, boxes, up_sizes, height: int, width: int, labels, row_begin: int,
                 row_end: int) -> None:
    """The label pass of sliding-window inference: writes rows [row_begin, row_end) of ``labels`` (B, H, W) int64.

    window_logits: per window (B, K, h_i, w_i) (read as float32), resized bilinearly (align_corners=False) to
    ``up_sizes[i]`` = (up_h, up_w) and placed, its top-left part, at ``boxes[i]`` = (y1, y2, x1, x2) of the
    height x width slide grid; the average over the windows covering each pixel is resized to (H, W) and arg-maxed
    over K (:func:`segformer_fast.ops.reference.slide_argmax`). Every pixel the rows read must be covered. The
    extension's CPU kernel reads, per block of output rows and class, only the windows that cover it, and its
    labels equal the reference's bit for bit where F.interpolate runs its generic kernel (output H + W > 128);
    elsewhere the reference computes the whole average and keeps the rows."""
    logits = [window.float().contiguous() for window in window_logits]
    if _has_kernel("slide_argmax", labels.device):
        torch.ops.segformer_fast.slide_argmax(logits, [int(v) for box in boxes for v in box],
                                              [int(v) for size in up_sizes for v in size], int(height), int(width),
                                              labels, int(row_begin), int(row_end))
        return
    if labels.device.type == "cpu":
        _warn_fallback("slide_argmax", labels.device)
    full = reference.slide_argmax(logits, boxes, up_sizes, height, width, labels.shape[1], labels.shape[2])
    labels[:, row_begin:row_end] = full[:, row_begin:row_end]
