"""The CPU engine's fast ops (``engine.backends.TorchOps``), each tested against :mod:`segformer_fast.ops.reference`.

What the CPU profile showed to matter (docs/DESIGN.md section 4, "The CPU path"):

- every GEMM through :func:`linear`: oneDNN (``mkldnn::_linear_pointwise``) for CPU fp32 / bf16 weights, packed
  once into its blocked layout (:func:`pack_linear_weight`), with the residual add fused into its epilogue. ATen's
  default CPU GEMM, MKL, ran at half of oneDNN's rate on the AMD EPYC we measure on (benchmarks/NOTES.md);
- the depthwise conv + bias + GELU as one oneDNN convolution with GELU as its post-op (:func:`dwconv_gelu`);
- the attention core: in bf16 on CPUs with AMX PyTorch's fused attention kernel (:func:`sdpa_attention`, whose
  GEMMs run on AMX), elsewhere the extension's ``kv_attention`` (:func:`sdpa_attention_is_faster` decides); by rows
  (:func:`attention_by_row_chunks`) where the extension is not built;
- the SR conv's patches as GEMM rows (:func:`sr_patches`). LayerNorm is the extension's CPU kernel
  (``extension.layer_norm``).

Elsewhere (CUDA tensors, fp64) and while tracing or compiling, the same functions run the standard ops, so a graph
traced through them holds no CPU-only op. Tokens are channels-last (B, H*W, C), row-major over the stage grid.
"""

import functools
import os

import torch
import torch.nn.functional as F

from segformer_fast.prepared.weights import MixFFNParams

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_BF16 = _ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_ONEDNN_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise")
#: Query rows per score block of the CPU attention: the (rows, Nkv) scores stay at 4 Mi elements (16 MiB fp32).
_SCORE_BLOCK_ELEMENTS = 4 << 20


def tracing() -> bool:
    """Whether the ops are being traced or compiled (ONNX / torch.export / torch.compile): those get the standard
    ops (``F.linear``), never the CPU-only oneDNN op."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def runs_on_onednn(weight) -> bool:
    """Whether a GEMM with this (plain) weight runs on oneDNN: a CPU fp32 tensor, or bf16 where oneDNN has bf16
    on this CPU, with a torch built with oneDNN, and not while tracing."""
    if weight.device.type != "cpu" or not _ONEDNN_LINEAR or tracing():
        return False
    if weight.dtype == torch.bfloat16:
        return _ONEDNN_BF16
    return weight.dtype == torch.float32


def pack_linear_weight(weight):
    """The (N, K) weight reordered once into oneDNN's blocked layout (an mkldnn tensor :func:`linear` takes), or
    the weight itself where :func:`linear` would not run it on oneDNN."""
    if weight is None or weight.is_mkldnn or not runs_on_onednn(weight):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x, weight, bias=None, residual=None):
    """x (..., K) Wᵀ + b (+ residual): weight (N, K) plain or packed (:func:`pack_linear_weight`), bias (N,) or
    None, residual (..., N) or None. On CPU in fp32 / bf16 oneDNN's GEMM (the residual add fused into its
    epilogue), elsewhere ``F.linear``."""
    if weight.is_mkldnn or runs_on_onednn(weight):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def sr_patches(x_norm, H, W, ratio):
    """The SR conv's R x R patches of (B, H*W, C) tokens as GEMM rows (B, floor(H/R)*floor(W/R), R*R*C) in
    (ky, kx, c) order, grids smaller than R zero-padded to R. Spelled with ``unfold``, which torch.export traces for
    any size (a slice to whole patches would be specialized to the traced size)."""
    batch, _, channels = x_norm.shape
    grid = x_norm.reshape(batch, H, W, channels)
    pad_h, pad_w = max(0, ratio - H), max(0, ratio - W)
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    patches = grid.unfold(1, ratio, ratio).unfold(2, ratio, ratio)  # (B, rows, cols, C, ky, kx)
    rows, cols = patches.shape[1], patches.shape[2]
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(batch, rows * cols, ratio * ratio * channels)


def attention_by_row_chunks(q, kv, heads):
    """softmax(q kᵀ) v per head: q (B, N, C) head-major, kv (B, Nkv, 2C) = [k | v] -> (B, N, C).

    Per image, head and block of query rows: the scores as one GEMM, softmax in place, then one GEMM with v, both
    through :func:`linear` (oneDNN on CPU, about twice the rate of ``scaled_dot_product_attention``'s CPU kernel
    on the short key side). Row blocks bound the scores' memory at long key sides."""
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


#: ``SEGFORMER_FAST_CPU_ATTENTION``: "sdpa" or "kernel" forces the attention core (tests, A/B runs); unset, the CPU's.
ATTENTION_CORE_VARIABLE = "SEGFORMER_FAST_CPU_ATTENTION"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles for bf16 (the ``amx_bf16`` flag of /proc/cpuinfo; False where it is not
    there)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in cpuinfo)
    except OSError:
        return False


def sdpa_attention_is_faster(dtype: torch.dtype) -> bool:
    """Whether PyTorch's fused CPU attention (:func:`sdpa_attention`) is the faster attention core here than the
    extension's ``kv_attention`` kernel.

    For bf16 on a CPU with AMX: ATen's flash-attention kernel runs its blocks' GEMMs on oneDNN's AMX kernels, while
    the extension's kernel computes with AVX-512 (``vdpbf16ps`` pair dot products at best); 1.24x (B0) and 1.42x
    (B2) faster whole-model on an AMX Xeon (benchmarks/NOTES.md). In fp32 the two were within 5 % there, and on an
    AMD EPYC (no AMX; MKL without its AVX-512 kernels) the extension's kernel was 1.2-3.7x faster in both dtypes: the
    kernel stays everywhere else (fp16 included). ``SEGFORMER_FAST_CPU_ATTENTION=sdpa|kernel`` overrides it."""
    forced = os.environ.get(ATTENTION_CORE_VARIABLE, "").strip().lower()
    if forced in ("sdpa", "kernel"):
        return forced == "sdpa" and dtype in (torch.float32, torch.bfloat16)
    return dtype == torch.bfloat16 and cpu_has_amx()


def sdpa_attention(q, kv, heads):
    """softmax(q kᵀ) v per head on PyTorch's fused attention kernel: q (B, N, C) head-major, projected and scaled
    (the scale is in q, so SDPA's is 1), kv (B, Nkv, 2C) = [k | v] -> (B, N, C) contiguous, in q's dtype. The heads
    are strided views of q and kv (no copies in); the kernel keeps its scores per block of query rows."""
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q_heads = q.view(batch, tokens, heads, head_dim).transpose(1, 2)
    kv_heads = kv.view(batch, kv.shape[1], 2, heads, head_dim)
    k, v = kv_heads[:, :, 0].transpose(1, 2), kv_heads[:, :, 1].transpose(1, 2)
    attended = F.scaled_dot_product_attention(q_heads, k, v, scale=1.0)
    return attended.transpose(1, 2).reshape(batch, tokens, channels)


def dwconv_gelu(h, H, W, dw_weight, dw_bias):
    """Depthwise 3x3 conv (padding 1) + bias + exact GELU of (B, H*W, C4) tokens; dw_weight (C4, 1, 3, 3).

    On CPU in fp32 / bf16 one oneDNN convolution with GELU (erf) fused as its post-op, channels-last in and out
    (1.02-1.04x the conv followed by ATen's GELU end to end: benchmarks/NOTES.md); elsewhere the conv, then GELU."""
    batch, tokens, hidden_channels = h.shape
    image = h.reshape(batch, H, W, hidden_channels).permute(0, 3, 1, 2)
    if _ONEDNN_CONV and runs_on_onednn(dw_weight):
        conv_gelu = torch.ops.mkldnn._convolution_pointwise(
            image, dw_weight, dw_bias, [1, 1], [1, 1], [1, 1], hidden_channels, "gelu", [], "none")
    else:
        conv_gelu = F.gelu(F.conv2d(image, dw_weight, dw_bias, padding=1, groups=hidden_channels))
    return conv_gelu.permute(0, 2, 3, 1).reshape(batch, tokens, hidden_channels)


def mixffn(x_norm, H, W, params: MixFFNParams, residual=None):
    """Mix-FFN of (B, H*W, C) normalized tokens: fc1, depthwise conv + GELU, fc2 (+ residual unless None, added in
    fc2's epilogue)."""
    hidden = linear(x_norm, params.fc1_weight, params.fc1_bias)
    hidden = dwconv_gelu(hidden, H, W, params.dw_weight, params.dw_bias)
    return linear(hidden, params.fc2_weight, params.fc2_bias, residual)


def project_stage(tokens, weight, batch: int, height: int, width: int):
    """One stage's folded decoder projection P_i = F_i W'_iᵀ: tokens (B, h*w, C_i) or (B*h*w, C_i) ->
    channels-last (B, h, w, D), one GEMM over the whole batch."""
    return linear(tokens, weight).view(batch, height, width, weight.shape[0])
