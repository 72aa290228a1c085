"""The reference of each op on the prepared weight layout: plain PyTorch, naive on purpose, one of each.

Every Triton kernel's ``*_ref``, the engine's ``kernels="eager"`` backend, the extension's eager fallbacks and the
tests run these, in fp32 or fp64 as ground truth. No fast path calls them (the CPU fast ops are
:mod:`segformer_fast.ops.cpu`, tested against these), so a change to a fast path never moves its reference.
Triton-free: it imports torch and the prepared weight dataclasses only.

Tokens are channels-last and row-major over the stage grid: x[b, y * W + x, c].
"""

import torch
import torch.nn.functional as F

from segformer_fast.prepared.weights import MixFFNParams, SRAttentionParams


def layer_norm(x, weight, bias, eps, residual=None):
    """LayerNorm over the last dim of x (..., C), or of s = x + residual: returns y, or (y, s) with a residual."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


def patch_embed_layer_norm(x, weight, bias, eps):
    """The patch-embed conv output x (B, C, H, W) as LayerNorm-ed tokens (B, H*W, C)."""
    return F.layer_norm(x.flatten(2).transpose(1, 2), (x.shape[1],), weight, bias, eps)


def linear(x, weight, bias=None, residual=None):
    """x (..., K) Wᵀ + b (+ residual): weight (N, K), bias (N,) or None, residual (..., N) or None."""
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def sr_patches(x_norm, H, W, ratio):
    """The SR conv's non-overlapping R x R patches of (B, H*W, C) tokens as GEMM rows (B, rows*cols, R*R*C),
    flattened in (ky, kx, c) order; rows = floor(H / R), cols = floor(W / R) (the conv floors: remainder rows and
    columns are dropped); grids smaller than R are zero-padded to R first."""
    batch, _, channels = x_norm.shape
    grid = x_norm.reshape(batch, H, W, channels)
    pad_h, pad_w = max(0, ratio - H), max(0, ratio - W)
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = grid.shape[1] // ratio, grid.shape[2] // ratio
    patches = grid[:, :rows * ratio, :cols * ratio].reshape(batch, rows, ratio, cols, ratio, channels)
    return patches.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, ratio * ratio * channels)


def sr_kv(x_norm, H, W, params: SRAttentionParams):
    """The merged k/v of one SR attention: (B, H*W, C) normalized tokens -> kv (B, Nkv, 2C) = [k | v].

    R > 1: the SR conv as a GEMM over :func:`sr_patches`, + bias, SR LayerNorm, then the k/v projection.
    R == 1: the k/v projection of x.
    """
    kv_tokens = x_norm
    if params.sr_ratio > 1:
        reduced = linear(sr_patches(x_norm, H, W, params.sr_ratio), params.sr_weight, params.sr_bias)
        kv_tokens = F.layer_norm(reduced, (x_norm.shape[-1],), params.sr_ln_weight, params.sr_ln_bias, params.sr_eps)
    return linear(kv_tokens, params.kv_weight, params.kv_bias)


def kv_attention(q, kv, heads):
    """softmax(q kᵀ) v per head: q (B, N, C) projected and scaled, kv (B, Nkv, 2C) = [k | v], heads splitting C
    head-major -> (B, N, C) (``scaled_dot_product_attention`` with scale 1: the scale is already in q)."""
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q = q.reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    kv = kv.reshape(batch, -1, 2, heads, head_dim)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(batch, tokens, channels)


def sr_attention(x_norm, residual, H, W, params: SRAttentionParams):
    """Spatial-reduction attention of (B, H*W, C) normalized tokens, + residual (B, H*W, C) unless None.

    q = x Wqᵀ + bq (the scale d^-0.5 is already in Wq, bq), k/v from :func:`sr_kv`, softmax(q kᵀ) v per head
    (:func:`kv_attention`), output projection + bias.
    """
    q = linear(x_norm, params.q_weight, params.q_bias)
    attended = kv_attention(q, sr_kv(x_norm, H, W, params), params.num_heads)
    return linear(attended, params.o_weight, params.o_bias, residual)


def dwconv_gelu(h, H, W, dw_weight, dw_bias):
    """Depthwise 3x3 conv (padding 1) + bias + exact GELU of (B, H*W, C4) tokens; dw_weight (C4, 1, 3, 3)."""
    batch, tokens, hidden_channels = h.shape
    grid = h.reshape(batch, H, W, hidden_channels)
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


def project_stage(tokens, weight, batch: int, height: int, width: int):
    """One stage's folded decoder projection P_i = F_i W'_iᵀ: tokens (B, h*w, C_i) or (B*h*w, C_i) ->
    channels-last (B, h, w, D)."""
    return linear(tokens, weight).reshape(batch, height, width, weight.shape[0])


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
    """Labels (B, height, width) int64: argmax over K of the bilinear upsampling of logits (B, K, h, w), computed in
    fp32 for fp16 / bf16 logits (the upsampled values are never rounded to half precision; fp64 stays fp64)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.interpolate(logits.to(compute), size=(height, width), mode="bilinear", align_corners=False).argmax(1)


def slide_argmax(window_logits, boxes, up_sizes, height, width, out_height, out_width):
    """Labels (B, out_height, out_width) int64 of mmseg's slide mode from its windows' logits: each window's logits
    (B, K, h_i, w_i) resized bilinearly (align_corners=False) in fp32 to ``up_sizes[i]``, the top-left
    (y2 - y1) x (x2 - x1) part added at ``boxes[i]`` = (y1, y2, x1, x2) of a (B, K, height, width) sum in window
    order, divided by the number of windows covering each pixel, resized to (out_height, out_width) when that
    differs, and arg-maxed over K."""
    batch, num_labels = window_logits[0].shape[:2]
    total = torch.zeros(batch, num_labels, height, width, dtype=torch.float32, device=window_logits[0].device)
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=total.device)
    for logits, (y1, y2, x1, x2), size in zip(window_logits, boxes, up_sizes):
        upsampled = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        total[:, :, y1:y2, x1:x2] += upsampled[:, :, :y2 - y1, :x2 - x1]
        count[:, :, y1:y2, x1:x2] += 1
    average = total.div_(count)
    if (out_height, out_width) != (height, width):
        average = F.interpolate(average, size=(out_height, out_width), mode="bilinear", align_corners=False)
    return average.argmax(1)
