"""The encoder and decoder ops on the prepared weight layout, in plain PyTorch: one implementation of each.

The engine's CPU path runs these; each Triton kernel's ``*_ref`` is one of these run in fp32 (or fp64); the
extension's eager fallbacks are ``fused_decode`` and ``upsample_argmax`` below. Triton-free: it imports torch and
the prepared weight dataclasses only.

Tokens are channels-last and row-major over the stage grid: x[b, y * W + x, c].

Every GEMM goes through :func:`linear`, which takes a plain (N, K) weight or one packed once by
:func:`pack_linear_weight` for oneDNN, the CPU GEMM library that uses AVX-512 on any x86 CPU that has it (ATen's
default CPU GEMM, MKL, ran at half of oneDNN's rate on the AMD EPYC we measure on; benchmarks/NOTES.md).
"""

import torch
import torch.nn.functional as F

from .prepared import MixFFNParams, SRAttentionParams


def layer_norm(x, weight, bias, eps, residual=None):
    """LayerNorm over the last dim of x (..., C), or of s = x + residual: returns y, or (y, s) with a residual."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


def patch_embed_layer_norm(x, weight, bias, eps):
    """The patch-embed conv output x (B, C, H, W) as LayerNorm-ed tokens (B, H*W, C)."""
    return F.layer_norm(x.flatten(2).transpose(1, 2), (x.shape[1],), weight, bias, eps)


def linear(x, weight, bias=None, residual=None):
    """x (..., K) Wᵀ + b (+ residual): weight (N, K) plain or packed (:func:`pack_linear_weight`), bias (N,) or
    None, residual (..., N) or None. On CPU in fp32 / bf16 it runs oneDNN's GEMM (the residual add fused into its
    epilogue), elsewhere ``F.linear``."""
    if weight.is_mkldnn or _runs_on_onednn(weight):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def _runs_on_onednn(weight) -> bool:
    """Whether a GEMM with this (plain) weight runs on oneDNN: a CPU fp32 tensor, or bf16 where oneDNN has bf16
    on this CPU, with a torch built with oneDNN."""
    if weight.device.type != "cpu" or not _ONEDNN_LINEAR or tracing():
        return False
    if weight.dtype == torch.bfloat16:
        return _ONEDNN_BF16
    return weight.dtype == torch.float32


def tracing() -> bool:
    """Whether the ops are being traced or compiled (ONNX / torch.export / torch.compile): those get the standard
    ops (``F.linear``), never the CPU-only oneDNN op."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_BF16 = _ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linear_weight(weight):
    """The (N, K) weight reordered once into oneDNN's blocked layout (an mkldnn tensor :func:`linear` takes), or
    the weight itself where :func:`linear` would not run it on oneDNN."""
    if weight is None or weight.is_mkldnn or not _runs_on_onednn(weight):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def sr_kv(x_norm, H, W, params: SRAttentionParams):
    """The merged k/v of one SR attention: (B, H*W, C) normalized tokens -> kv (B, Nkv, 2C) = [k | v].

    R > 1: the SR conv as the kernels compute it, a GEMM over non-overlapping R x R patches flattened in
    (ky, kx, c) order (the conv floors: remainder rows and columns are dropped; grids smaller than R are
    zero-padded to R first), + bias, SR LayerNorm, then the k/v projection. R == 1: the k/v projection of x.
    """
    batch, _, channels = x_norm.shape
    ratio = params.sr_ratio
    kv_tokens = x_norm
    if ratio > 1:
        grid = x_norm.reshape(batch, H, W, channels)
        pad_h, pad_w = max(0, ratio - H), max(0, ratio - W)
        if pad_h or pad_w:
            grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = grid.shape[1] // ratio, grid.shape[2] // ratio
        patches = grid[:, :rows * ratio, :cols * ratio].reshape(batch, rows, ratio, cols, ratio, channels)
        patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, ratio * ratio * channels)
        reduced = linear(patches, params.sr_weight, params.sr_bias)
        kv_tokens = F.layer_norm(reduced, (channels,), params.sr_ln_weight, params.sr_ln_bias, params.sr_eps)
    return linear(kv_tokens, params.kv_weight, params.kv_bias)


def sr_attention(x_norm, residual, H, W, params: SRAttentionParams):
    """Spatial-reduction attention of (B, H*W, C) normalized tokens, + residual (B, H*W, C) unless None.

    q = x Wqᵀ + bq (the scale d^-0.5 is already in Wq, bq), k/v from :func:`sr_kv`, softmax(q kᵀ) v per head
    (:func:`kv_attention`), output projection + bias.
    """
    q = linear(x_norm, params.q_weight, params.q_bias)
    attended = kv_attention(q, sr_kv(x_norm, H, W, params), params.num_heads)
    return linear(attended, params.o_weight, params.o_bias, residual)


def kv_attention(q, kv, heads):
    """softmax(q kᵀ) v per head: q (B, N, C) projected and scaled, kv (B, Nkv, 2C) = [k | v], heads splitting C
    head-major -> (B, N, C). On CPU two oneDNN GEMMs per head and row block, elsewhere (and while tracing)
    ``scaled_dot_product_attention``."""
    if q.device.type == "cpu" and not tracing():
        return _attention_by_row_chunks(q, kv, heads)
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q = q.view(batch, tokens, heads, head_dim).transpose(1, 2)
    kv = kv.view(batch, -1, 2, heads, head_dim)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(batch, tokens, channels)


#: Query rows per score block of the CPU attention: the (rows, Nkv) scores stay at 4 Mi elements (16 MiB fp32).
_SCORE_BLOCK_ELEMENTS = 4 << 20


def _attention_by_row_chunks(q, kv, heads):
    """softmax(q kᵀ) v per head on CPU: q (B, N, C) head-major, kv (B, Nkv, 2C) = [k | v] -> (B, N, C).

    Per image, head and block of query rows: the scores as one GEMM, softmax in place, then one GEMM with v; both
    GEMMs on oneDNN (:func:`linear`), which runs at about twice the rate of ``scaled_dot_product_attention``'s CPU
    kernel on the short key side (Nkv = 256 at 512²). Row blocks bound the scores' memory at long key sides."""
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    rows_per_block = max(1, _SCORE_BLOCK_ELEMENTS // kv.shape[1])
    attended = torch.empty_like(q)
    for image in range(batch):
        for head in range(heads):
            columns = slice(head * head_dim, (head + 1) * head_dim)
            k = kv[image, :, columns].contiguous()
            v_t = kv[image, :, channels + head * head_dim:channels + (head + 1) * head_dim].t().contiguous()
            q_head = q[image, :, columns] if heads == 1 else q[image, :, columns].contiguous()
            for start in range(0, tokens, rows_per_block):
                scores = linear(q_head[start:start + rows_per_block], k)
                torch.softmax(scores, -1, out=scores)
                attended[image, start:start + rows_per_block, columns] = linear(scores, v_t)
    return attended


def dwconv_gelu(h, H, W, dw_weight, dw_bias):
    """Depthwise 3x3 conv (padding 1) + bias + exact GELU of (B, H*W, C4) tokens; dw_weight (C4, 1, 3, 3).

    On CPU in fp32 / bf16 (not while tracing) one oneDNN convolution with GELU fused as its post-op (up to 1.5× the
    conv followed by ATen's GELU at SegFormer's stage-1 shapes, 1.02-1.04× end to end: benchmarks/NOTES.md); else
    the conv, then GELU."""
    batch, tokens, hidden_channels = h.shape
    grid = h.reshape(batch, H, W, hidden_channels)
    if _runs_on_onednn(dw_weight) and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        # oneDNN's depthwise conv with GELU (erf) as its post-op: one pass, channels-last in and out
        conv_gelu = torch.ops.mkldnn._convolution_pointwise(
            grid.permute(0, 3, 1, 2), dw_weight, dw_bias, [1, 1], [1, 1], [1, 1], hidden_channels, "gelu", [], "none")
        return conv_gelu.permute(0, 2, 3, 1).reshape(batch, tokens, hidden_channels)
    if h.dtype == torch.float64:
        # the same sum as nine shifted slices: CPU conv2d in fp64 can take seconds per call
        padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
        taps = dw_weight.reshape(hidden_channels, 9)
        conv = dw_bias + sum(padded[:, i // 3:i // 3 + H, i % 3:i % 3 + W] * taps[:, i] for i in range(9))
    else:
        conv = F.conv2d(grid.permute(0, 3, 1, 2), dw_weight, dw_bias, padding=1,
                        groups=hidden_channels).permute(0, 2, 3, 1)
    return F.gelu(conv.reshape(batch, tokens, hidden_channels))


def mixffn(x_norm, H, W, params: MixFFNParams, residual=None):
    """Mix-FFN of (B, H*W, C) normalized tokens: fc1, depthwise conv + GELU, fc2 (+ residual unless None)."""
    hidden = linear(x_norm, params.fc1_weight, params.fc1_bias)
    hidden = dwconv_gelu(hidden, H, W, params.dw_weight, params.dw_bias)
    return linear(hidden, params.fc2_weight, params.fc2_bias, residual)


def fused_decode(p1, p2, p3, p4, bias, cls_weight, cls_bias):
    """The folded decoder tail: logits = ReLU(sum_i up_i(P_i) + bias) W_clsᵀ + b_cls, in fp32 (fp64 for fp64
    inputs), cast back.

    p1..p4: (B, h_i, w_i, D) channels-last stage projections (p1 on the output grid); up_i is bilinear
    (align_corners=False) resizing to (h_1, w_1). Returns logits (B, K, h_1, w_1) contiguous in p1's dtype.
    """
    compute = torch.float64 if p1.dtype == torch.float64 else torch.float32
    size = p1.shape[1:3]
    hidden = p1.to(compute) + bias.to(compute)
    for projected in (p2, p3, p4):
        image = projected.to(compute).permute(0, 3, 1, 2)
        if image.shape[2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        hidden = hidden + image.permute(0, 2, 3, 1)
    logits = torch.relu(hidden) @ cls_weight.to(compute).t() + cls_bias.to(compute)
    return logits.permute(0, 3, 1, 2).contiguous().to(p1.dtype)


def upsample_argmax(logits, height, width):
    """Labels (B, height, width) int64: argmax over K of the bilinear upsampling of logits (B, K, h, w)."""
    return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).argmax(1)
