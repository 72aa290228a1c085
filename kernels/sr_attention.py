"""Spatial-reduction (efficient) self-attention of one SegFormer block, fused.

Math (docs/DESIGN.md section 3), per image, for x = LN1(block input) as tokens (N = H*W, C), row-major over (H, W):

    q  = x Wqᵀ + bq
    kv = LN_sr(Conv2d(C, C, k=R, s=R)(x as (C, H, W)))  if R > 1   (Nkv = Hkv*Wkv, Hkv = (H-R)//R + 1)
    kv = x                                               if R == 1  (Nkv = N)
    k  = kv Wkᵀ + bk,  v = kv Wvᵀ + bv
    o_h = softmax(q_h k_hᵀ · d^-0.5) v_h    per head h (head-major channel split, d = C / heads)
    out = residual + concat_h(o_h) Woᵀ + bo

Kernels (each launch's grid and tiles come from a pure function, ``sr_kv_launches`` /
``flash_sr_attention_launch``, that ``tests/kernels/test_launch_grids.py`` checks for a wave of blocks):

1. (in ``sr_kv.py``) ``_sr_kv_kernel`` (R > 1): the non-overlapping R x R patchify GEMM (K = R²·C) + conv bias +
   SR LayerNorm (fp32 statistics) + the merged k/v projection, in one launch; writes kv (B, Nkv, 2C) = [k | v].
   Where that grid (reduced-token blocks x images) is short of a wave, as at batch 1, two launches instead:
   ``_sr_patchify_kernel`` splits the patchify's K = R²·C reduction over the grid into fp32 partials, and
   ``_sr_norm_kv_kernel`` sums them, adds the bias, normalizes and computes one column block of k/v per block.
   For R == 1 the k/v projection is one ``linear`` launch on x.
2. ``_flash_sr_attention_kernel``: per block of BLOCK_M query tokens: the q projection in the prologue (scale
   d^-0.5 folded into Wq/bq by ``prepare_sr_attention_params``, log2(e) applied in fp32 for exp2), an online
   softmax over the short KV in fp32 (the N x Nkv score matrix never exists), and, when C <= 256 (B0's
   32/64/160/256 and B1-B5's 64/128) and the grid has a wave of blocks (or one head), the output projection + bias
   + residual in the epilogue, accumulated over the heads, which the block loops over. Otherwise (C = 320, 512,
   or a short grid) the heads are a grid axis, the kernel writes the concatenated head outputs and a ``linear``
   launch does the output projection + bias + residual. fp32 has its own tiles (fp32 dots run on FMA units,
   operands in registers): BLOCK_M <= 32 (16 for 64-wide heads), BLOCK_N 32, 8 warps, and the fused output
   projection only up to C = 64 with 64-wide heads; no fp32 configuration spills on sm_90.

Constraints: head_dim d = C / num_heads a power of two in [16, 128] (SegFormer: 32 for B0, 64 for B1-B5);
R > 1 needs H >= R and W >= R (at least one reduced token), and C <= 512 for the fused KV kernel.

The references (``sr_kv_ref``, ``sr_attention_ref``) are ``segformer_fast.ops.reference``'s ops in the reference dtype.
"""


import torch
import triton
import triton.language as tl

from segformer_fast.core.runtime import MAX_FUSED_OUT_CHANNELS  # the memory model reads it there too
from segformer_fast.kernels.common import (
    Launch,
    check_out,
    mma,
    pick_launch,
    ref_dtype,
    upcast_dot,
)
from segformer_fast.kernels.linear import linear
from segformer_fast.kernels.sr_kv import check_sr_input, reduced_size, sr_kv, sr_kv_launches, sr_kv_ref
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import check_tensor


@triton.jit
def _flash_sr_attention_kernel(
    x_ptr, qw_ptr, qb_ptr, kv_ptr, ow_ptr, ob_ptr, res_ptr, out_ptr,
    N, NKV,
    C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, C_PAD: tl.constexpr,
    FUSE_OUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)  # the head when the output projection is not fused (grid axis 1 = heads), else 0
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tok = pid_b * N + rows
    d = tl.arange(0, HEAD_DIM)
    dtype = out_ptr.dtype.element_ty
    if FUSE_OUT:
        co = tl.arange(0, C_PAD)
        co_mask = co < C
        out_acc = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)

    for h in range(pid_h, pid_h + (NUM_HEADS if FUSE_OUT else 1)):
        hd = h * HEAD_DIM + d
        # prologue: q_h = x Wq_hᵀ + bq_h (scale already folded), times log2(e) for exp2
        q = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < C
            a = tl.load(x_ptr + tok[:, None] * C + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(qw_ptr + hd[None, :] * C + ks[:, None], mask=k_mask[:, None], other=0.0)
            q = mma(a, w, q, UPCAST)
        q = ((q + tl.load(qb_ptr + hd).to(tl.float32)[None, :]) * LOG2E).to(dtype)

        # online softmax over the reduced tokens, statistics in fp32
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for n0 in range(0, NKV, BLOCK_N):
            kr = n0 + tl.arange(0, BLOCK_N)
            kr_mask = kr < NKV
            kv_rows = pid_b * NKV + kr
            k_t = tl.load(kv_ptr + kv_rows[None, :] * (2 * C) + hd[:, None], mask=kr_mask[None, :], other=0.0)
            s = mma(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
            s = tl.where(kr_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(kv_ptr + kv_rows[:, None] * (2 * C) + C + hd[None, :], mask=kr_mask[:, None], other=0.0)
            acc = mma(p.to(dtype), v, acc * alpha[:, None], UPCAST)
            m_i = m_new
        o = (acc / l_i[:, None]).to(dtype)

        if FUSE_OUT:
            # epilogue, part h: out_acc += o_h Wo[:, head h]ᵀ
            wo = tl.load(ow_ptr + co[None, :] * C + hd[:, None], mask=co_mask[None, :], other=0.0)
            out_acc = mma(o, wo, out_acc, UPCAST)
        else:
            tl.store(out_ptr + tok[:, None] * C + hd[None, :], o, mask=row_mask[:, None])

    if FUSE_OUT:
        offs = tok[:, None] * C + co[None, :]
        mask = row_mask[:, None] & co_mask[None, :]
        out_acc += tl.load(ob_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            out_acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, out_acc.to(dtype), mask=mask)


def flash_sr_attention_launch(B, N, NKV, C, num_heads, head_dim, dtype) -> Launch:
    """The launch of ``flash_sr_attention``. The output projection is fused into the epilogue (heads looped inside
    the block, grid: query blocks x 1 x images) where C allows it (C <= 256; fp32 with 64-wide heads: C <= 64) and
    that grid has a wave of blocks, or there is one head; otherwise the heads go in the grid (query blocks x heads x
    images) and a ``linear`` does the output projection. BLOCK_M: the largest of 64 / 32 / 16 (fp32: 32 / 16 for
    32-wide heads, 16 for 64-wide) that gives a wave. fp32 dots run on FMA units with the operands in registers:
    its smaller tiles, BLOCK_N 32 (16-wide key blocks spilled at C = 160 / 256) and 8 warps keep them from
    spilling."""
    fp32 = dtype == torch.float32
    fusable = C <= (64 if fp32 and head_dim > 32 else MAX_FUSED_OUT_CHANNELS)
    sizes = ((32, 16) if head_dim <= 32 else (16,)) if fp32 else (64, 32, 16)
    block_n = 32 if fp32 else max(16, min(64, triton.next_power_of_2(NKV)))
    C_PAD = triton.next_power_of_2(C)

    def make(block_m, fuse):
        return Launch("_flash_sr_attention_kernel", (triton.cdiv(N, block_m), 1 if fuse else num_heads, B),
                      {"C_PAD": C_PAD, "FUSE_OUT": fuse, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32},
                      num_warps=warps(block_m, fuse), num_stages=2)

    def warps(block_m, fuse):
        if fp32:  # 16 x 32 fp32 tiles over 8 warps spilled (ptxas kept 64 registers); 4 warps hold them
            return 4 if block_m == 16 and head_dim <= 32 else 8
        return 8 if fuse and C_PAD >= 256 else 4

    if fusable:
        fused = pick_launch(make(block_m, True) for block_m in sizes)
        if not fused.reason or num_heads == 1:
            return fused
    why = "" if fusable else f"the output projection of C={C} is a separate launch; heads are in the grid"
    return pick_launch((make(block_m, False) for block_m in sizes), why_fewer=why)


def flash_sr_attention(x_norm, kv, params, residual=None, out=None):
    """Attention of x_norm's queries over the reduced keys/values, with q and output projections fused.

    x_norm: (B, N, C); kv: (B, Nkv, 2C) from ``sr_kv`` (Nkv >= 1); residual: (B, N, C) or None; out: optional
    (B, N, C). Returns residual + softmax(q kᵀ · d^-0.5) v Woᵀ + bo, (B, N, C) in x_norm's dtype.
    """
    B, N, C = check_sr_input(x_norm, params)
    check_tensor("kv", kv, shape=(B, None, 2 * C), dtype=x_norm.dtype, device=x_norm.device)
    NKV = kv.shape[1]
    if NKV < 1:
        raise ValueError(f"kv: expected at least 1 key/value token, got shape {tuple(kv.shape)}")
    if residual is not None:
        check_tensor("residual", residual, shape=(B, N, C), dtype=x_norm.dtype, device=x_norm.device)
    y = check_out(out, (B, N, C), x_norm)
    if B == 0 or N == 0:
        return y
    launch = flash_sr_attention_launch(B, N, NKV, C, params.num_heads, params.head_dim, x_norm.dtype)
    fuse_out = launch.meta["FUSE_OUT"]
    attn = y if fuse_out else torch.empty_like(y)
    _flash_sr_attention_kernel[launch.grid](
        x_norm, params.q_weight, params.q_bias, kv, params.o_weight, params.o_bias,
        residual if residual is not None else x_norm, attn,
        N, NKV,
        C=C, NUM_HEADS=params.num_heads, HEAD_DIM=params.head_dim, HAS_RESIDUAL=residual is not None,
        **launch.meta, UPCAST=upcast_dot(x_norm.dtype), num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if not fuse_out:
        linear(attn, params.o_weight, params.o_bias, residual=residual, out=y)
    return y


def sr_attention(x_norm, residual, H, W, params, out=None):
    """One block's attention branch plus residual: ``residual + Attn(x_norm)``.

    x_norm: (B, N = H*W, C) = LN1(block input) tokens, row-major over (H, W); residual: (B, N, C) block input
    (or None for the bare attention output); params: ``SRAttentionParams`` in x_norm's dtype and device.
    Returns (B, N, C) in x_norm's dtype. Two launches for C <= 256 (KV, attention), three for wider C.
    """
    kv = sr_kv(x_norm, H, W, params)
    return flash_sr_attention(x_norm, kv, params, residual=residual, out=out)


def sr_attention_ref(x_norm, residual, H, W, params, upcast=True):
    """``reference.sr_attention`` in fp32 (fp64 inputs stay fp64) when ``upcast``, else in x_norm's dtype (the eager
    composition for the tolerance rule and the benchmark). Same arguments and shapes as ``sr_attention``."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return reference.sr_attention(x_norm.to(dt), None if residual is None else residual.to(dt), H, W,
                                  params.to(dtype=dt))


def sr_attention_flops(B, N, C, sr_ratio, H, W):
    """Multiply-adds x 2 of one SR attention (q, patchify, k/v, scores, values, output projection)."""
    Hkv, Wkv = reduced_size(H, W, sr_ratio)
    nkv = Hkv * Wkv
    patchify = nkv * C * C * sr_ratio * sr_ratio if sr_ratio > 1 else 0
    return 2 * B * (N * C * C + patchify + nkv * 2 * C * C + 2 * N * nkv * C + N * C * C)


__all__ = [
    "reduced_size", "sr_kv", "flash_sr_attention", "sr_kv_launches", "flash_sr_attention_launch",
    "sr_attention", "sr_kv_ref", "sr_attention_ref", "sr_attention_flops",
]
