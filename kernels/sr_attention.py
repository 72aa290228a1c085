"""Spatial-reduction (efficient) self-attention of one SegFormer block, fused.

Math (docs/DESIGN.md section 3), per image, for x = LN1(block input) as tokens (N = H*W, C), row-major over (H, W):

    q  = x Wqᵀ + bq
    kv = LN_sr(Conv2d(C, C, k=R, s=R)(x as (C, H, W)))  if R > 1   (Nkv = Hkv*Wkv, Hkv = (H-R)//R + 1)
    kv = x                                               if R == 1  (Nkv = N)
    k  = kv Wkᵀ + bk,  v = kv Wvᵀ + bv
    o_h = softmax(q_h k_hᵀ · d^-0.5) v_h    per head h (head-major channel split, d = C / heads)
    out = residual + concat_h(o_h) Woᵀ + bo

Kernels:

1. ``_sr_kv_kernel`` (R > 1): the non-overlapping R x R patchify GEMM (K = R²·C) + conv bias + SR LayerNorm
   (fp32 statistics) + the merged k/v projection, in one launch; writes kv (B, Nkv, 2C) = [k | v].
   For R == 1 the k/v projection is one ``linear`` launch on x.
2. ``_flash_sr_attention_kernel``: per block of BLOCK_M query tokens and per head: the q projection in the
   prologue (scale d^-0.5 folded into Wq/bq by ``prepare_sr_attention_params``, log2(e) applied in fp32 for exp2),
   an online softmax over the short KV in fp32 (the N x Nkv score matrix never exists), and, when C <= 256 (B0's
   32/64/160/256 and B1-B5's 64/128), the output projection + bias + residual in the epilogue, accumulated over
   heads in registers. For C > 256 (B1-B5's 320 and 512) the kernel writes the concatenated head outputs and a
   separate ``linear`` launch does the output projection + bias + residual. fp32 has its own tiles (fp32 dots
   run on FMA units, operands in registers): BLOCK_M 32 (16 for 64-wide heads), BLOCK_N <= 32, 8 warps, and the
   fused output projection only up to C = 64 with 64-wide heads; no fp32 configuration spills on sm_90.

Constraints: head_dim d = C / num_heads a power of two in [16, 128] (SegFormer: 32 for B0, 64 for B1-B5);
R > 1 needs H >= R and W >= R (at least one reduced token), and C <= 512 for the fused KV kernel.

The references (``sr_kv_ref``, ``sr_attention_ref``) are ``segformer_fast.ops.reference``'s ops in the reference dtype.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from segformer_fast.ops import reference as torch_ops
from segformer_fast.prepared.weights import SRAttentionParams, check_tensor

from .common import check_compute_dtype, check_device, check_out, mma, ref_dtype, upcast_dot
from .linear import linear

#: Widest C whose output projection is fused into the attention epilogue (accumulator BLOCK_M x 256 in fp32).
MAX_FUSED_OUT_CHANNELS = 256
#: Widest C the fused KV kernel handles (its normalized reduced tile is BLOCK_M x next_pow2(C)).
MAX_SR_CHANNELS = 512


def reduced_size(H, W, sr_ratio):
    """(Hkv, Wkv): spatial size of the reduced tokens, floor((H - R) / R) + 1 (the conv's, no padding)."""
    if sr_ratio == 1:
        return H, W
    return (H - sr_ratio) // sr_ratio + 1, (W - sr_ratio) // sr_ratio + 1


@triton.jit
def _sr_kv_kernel(
    x_ptr, srw_ptr, srb_ptr, lnw_ptr, lnb_ptr, kvw_ptr, kvb_ptr, kv_ptr,
    H, W, WKV, NKV, eps,
    C: tl.constexpr, R: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < NKV
    py = r // WKV
    px = r % WKV
    co = tl.arange(0, C_PAD)
    co_mask = co < C

    # patchify GEMM: z[r, co] = sum over (ky, kx, ci) of x[token (py*R+ky, px*R+kx), ci] * Wsr[co, ky, kx, ci]
    z = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    for kk in range(R * R):
        tok = pid_b * H * W + (py * R + kk // R) * W + (px * R + kk % R)
        for c0 in range(0, C, BLOCK_K):
            ci = c0 + tl.arange(0, BLOCK_K)
            ci_mask = ci < C
            a = tl.load(x_ptr + tok[:, None] * C + ci[None, :], mask=r_mask[:, None] & ci_mask[None, :], other=0.0)
            w = tl.load(srw_ptr + co[None, :] * (R * R * C) + kk * C + ci[:, None],
                        mask=co_mask[None, :] & ci_mask[:, None], other=0.0)
            z = mma(a, w, z, UPCAST)
    z += tl.load(srb_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]

    # SR LayerNorm over the C real channels (padded columns are exactly zero and excluded)
    mean = tl.sum(z, axis=1) / C
    zc = tl.where(co_mask[None, :], z - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(zc * zc, axis=1) / C + eps)
    lnw = tl.load(lnw_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    zn = (zc * rstd[:, None] * lnw[None, :] + lnb[None, :]).to(kv_ptr.dtype.element_ty)

    # merged k/v projection: kv[r, n] = zn[r, :] . Wkv[n, :] + bkv[n], n in [0, 2C)
    out_rows = pid_b * NKV + r
    for n0 in range(0, 2 * C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < 2 * C
        w2 = tl.load(kvw_ptr + n[None, :] * C + co[:, None], mask=n_mask[None, :] & co_mask[:, None], other=0.0)
        kv = mma(zn, w2, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
        kv += tl.load(kvb_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(kv_ptr + out_rows[:, None] * (2 * C) + n[None, :], kv.to(kv_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & n_mask[None, :])


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
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tok = pid_b * N + rows
    d = tl.arange(0, HEAD_DIM)
    dtype = out_ptr.dtype.element_ty
    if FUSE_OUT:
        co = tl.arange(0, C_PAD)
        co_mask = co < C
        out_acc = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)

    for h in range(NUM_HEADS):
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


def _check_x(x_norm, params):
    check_tensor("x_norm", x_norm, shape=(None, None, None))
    check_compute_dtype("x_norm", x_norm)
    check_device("x_norm", x_norm)
    B, N, C = x_norm.shape
    if not isinstance(params, SRAttentionParams):
        raise TypeError(f"params: expected SRAttentionParams, got {type(params).__name__}")
    if params.channels != C:
        raise ValueError(f"params: expected weights for C={C} channels (from x_norm), got C={params.channels}")
    d = params.head_dim
    if d * params.num_heads != C or d < 16 or d > 128 or d & (d - 1):
        raise ValueError(f"head_dim: expected a power of two in [16, 128] dividing C={C}, got C / num_heads = "
                         f"{C} / {params.num_heads}")
    for f in dataclasses.fields(params):
        t = getattr(params, f.name)
        if isinstance(t, torch.Tensor):
            check_tensor(f"params.{f.name}", t, dtype=x_norm.dtype, device=x_norm.device)
    return B, N, C


def sr_kv(x_norm, H, W, params, out=None):
    """k and v of one SR attention, side by side.

    x_norm: (B, N = H*W, C) normalized block input; params: ``SRAttentionParams`` in x_norm's dtype.
    Returns kv: (B, Nkv, 2C) with kv[..., :C] = k and kv[..., C:] = v; Nkv = Hkv*Wkv (``reduced_size``).
    """
    B, N, C = _check_x(x_norm, params)
    if H < 1 or W < 1 or H * W != N:
        raise ValueError(f"H, W: expected H * W == N={N} with H, W >= 1, got H={H}, W={W}")
    R = params.sr_ratio
    Hkv, Wkv = reduced_size(H, W, R)
    if Hkv < 1 or Wkv < 1:
        raise ValueError(f"H, W: expected H >= R and W >= R for sr_ratio R={R} (at least one reduced token), "
                         f"got H={H}, W={W}")
    NKV = Hkv * Wkv
    kv = check_out(out, (B, NKV, 2 * C), x_norm)
    if R == 1:
        return linear(x_norm, params.kv_weight, params.kv_bias, out=kv)
    if C > MAX_SR_CHANNELS:
        raise ValueError(f"x_norm: the fused SR kernel takes at most {MAX_SR_CHANNELS} channels, got C={C}")
    if B == 0:
        return kv
    C_PAD = triton.next_power_of_2(C)
    BLOCK_M = 32 if C_PAD <= 256 else 16
    BLOCK_K = 32
    BLOCK_N = 64
    _sr_kv_kernel[(triton.cdiv(NKV, BLOCK_M), B)](
        x_norm, params.sr_weight, params.sr_bias, params.sr_ln_weight, params.sr_ln_bias,
        params.kv_weight, params.kv_bias, kv,
        H, W, Wkv, NKV, params.sr_eps,
        C=C, R=R, C_PAD=C_PAD, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
        UPCAST=upcast_dot(x_norm.dtype), num_warps=4 if C_PAD <= 128 else 8, num_stages=2,
    )
    return kv


def flash_sr_attention(x_norm, kv, params, residual=None, out=None):
    """Attention of x_norm's queries over the reduced keys/values, with q and output projections fused.

    x_norm: (B, N, C); kv: (B, Nkv, 2C) from ``sr_kv`` (Nkv >= 1); residual: (B, N, C) or None; out: optional
    (B, N, C). Returns residual + softmax(q kᵀ · d^-0.5) v Woᵀ + bo, (B, N, C) in x_norm's dtype.
    """
    B, N, C = _check_x(x_norm, params)
    check_tensor("kv", kv, shape=(B, None, 2 * C), dtype=x_norm.dtype, device=x_norm.device)
    NKV = kv.shape[1]
    if NKV < 1:
        raise ValueError(f"kv: expected at least 1 key/value token, got shape {tuple(kv.shape)}")
    if residual is not None:
        check_tensor("residual", residual, shape=(B, N, C), dtype=x_norm.dtype, device=x_norm.device)
    y = check_out(out, (B, N, C), x_norm)
    if B == 0 or N == 0:
        return y
    fp32 = x_norm.dtype == torch.float32
    # fp32 dots run on FMA units with the operands in registers: smaller query tiles keep them from spilling, and
    # with 64-wide heads the fused output projection only fits up to C = 64
    fuse_out = C <= (64 if fp32 and params.head_dim > 32 else MAX_FUSED_OUT_CHANNELS)
    attn = y if fuse_out else torch.empty_like(y)
    C_PAD = triton.next_power_of_2(C)
    BLOCK_M = (16 if params.head_dim > 32 else 32) if fp32 else 64
    BLOCK_N = max(16, min(32 if fp32 else 64, triton.next_power_of_2(NKV)))
    _flash_sr_attention_kernel[(triton.cdiv(N, BLOCK_M), B)](
        x_norm, params.q_weight, params.q_bias, kv, params.o_weight, params.o_bias,
        residual if residual is not None else x_norm, attn,
        N, NKV,
        C=C, NUM_HEADS=params.num_heads, HEAD_DIM=params.head_dim, C_PAD=C_PAD,
        FUSE_OUT=fuse_out, HAS_RESIDUAL=residual is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=32, UPCAST=upcast_dot(x_norm.dtype),
        num_warps=8 if fp32 or (fuse_out and C_PAD >= 256) else 4, num_stages=2,
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


def sr_kv_ref(x_norm, H, W, params, upcast=True):
    """``torch_ops.sr_kv`` (patchify GEMM + SR LayerNorm + k/v projection) in fp32 (fp64 stays fp64) when
    ``upcast``, else in x_norm's dtype. Returns (B, Nkv, 2C)."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return torch_ops.sr_kv(x_norm.to(dt), H, W, params.to(dtype=dt))


def sr_attention_ref(x_norm, residual, H, W, params, upcast=True):
    """``torch_ops.sr_attention`` in fp32 (fp64 inputs stay fp64) when ``upcast``, else in x_norm's dtype (the eager
    composition for the tolerance rule and the benchmark). Same arguments and shapes as ``sr_attention``."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return torch_ops.sr_attention(x_norm.to(dt), None if residual is None else residual.to(dt), H, W,
                                  params.to(dtype=dt))


def sr_attention_flops(B, N, C, sr_ratio, H, W):
    """Multiply-adds x 2 of one SR attention (q, patchify, k/v, scores, values, output projection)."""
    Hkv, Wkv = reduced_size(H, W, sr_ratio)
    nkv = Hkv * Wkv
    patchify = nkv * C * C * sr_ratio * sr_ratio if sr_ratio > 1 else 0
    return 2 * B * (N * C * C + patchify + nkv * 2 * C * C + 2 * N * nkv * C + N * C * C)


__all__ = [
    "reduced_size", "sr_kv", "flash_sr_attention",
    "sr_attention", "sr_kv_ref", "sr_attention_ref", "sr_attention_flops",
]
