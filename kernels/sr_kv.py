"""The keys and values of one spatial-reduction attention (``sr_kv``), the first half of ``sr_attention.py``'s op.

For R > 1: kv = [k | v] = LN_sr(Conv2d(C, C, k=R, s=R)(x as an image)) [Wk; Wv]ᵀ + [bk; bv], (B, Nkv, 2C), from

- ``_sr_kv_kernel``: the patchify GEMM (K = R²·C) + conv bias + SR LayerNorm (fp32 statistics) + the merged k/v
  projection in one launch, one block per BLOCK_M reduced tokens, where that grid has a wave of blocks;
- otherwise (a short grid, as at batch 1) ``_sr_patchify_kernel``, the patchify split over its K reduction into fp32
  partials, then ``_sr_norm_kv_kernel``: their sum + bias + LayerNorm + one k/v column block per block.

For R == 1 the k/v projection is one ``linear`` launch on x. ``sr_kv_launches`` computes the launches (a pure
function of the shapes, checked by tests/kernels/test_launch_grids.py); ``sr_kv_ref`` is the reference.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from segformer_fast.kernels.common import (
    Launch,
    check_compute_dtype,
    check_device,
    check_out,
    mma,
    pick_launch,
    ref_dtype,
    upcast_dot,
    wave_blocks,
)
from segformer_fast.kernels.linear import linear
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import SRAttentionParams, check_tensor

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
def _sr_patchify_kernel(
    x_ptr, srw_ptr, z_ptr,
    H, W, WKV, NKV, BATCH, CHUNKS, CHUNKS_PER_SPLIT,
    C: tl.constexpr, R: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    # split-K patchify: split s sums the K chunks [s * CHUNKS_PER_SPLIT, (s + 1) * CHUNKS_PER_SPLIT) of the
    # R*R*C reduction (chunk = (tap, BLOCK_K channels)) into fp32 partials z[s, b, r, :C]
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < NKV
    py = r // WKV
    px = r % WKV
    co = tl.arange(0, C_PAD)
    co_mask = co < C
    CHUNKS_PER_TAP: tl.constexpr = (C + BLOCK_K - 1) // BLOCK_K
    z = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    first = pid_s * CHUNKS_PER_SPLIT
    for chunk in range(first, tl.minimum(first + CHUNKS_PER_SPLIT, CHUNKS)):
        kk = chunk // CHUNKS_PER_TAP
        ci = (chunk % CHUNKS_PER_TAP) * BLOCK_K + tl.arange(0, BLOCK_K)
        ci_mask = ci < C
        tok = pid_b * H * W + (py * R + kk // R) * W + (px * R + kk % R)
        a = tl.load(x_ptr + tok[:, None] * C + ci[None, :], mask=r_mask[:, None] & ci_mask[None, :], other=0.0)
        w = tl.load(srw_ptr + co[None, :] * (R * R * C) + kk * C + ci[:, None],
                    mask=co_mask[None, :] & ci_mask[:, None], other=0.0)
        z = mma(a, w, z, UPCAST)
    rows = (pid_s * BATCH + pid_b) * NKV + r
    tl.store(z_ptr + rows[:, None] * C + co[None, :], z, mask=r_mask[:, None] & co_mask[None, :])


@triton.jit
def _sr_norm_kv_kernel(
    z_ptr, srb_ptr, lnw_ptr, lnb_ptr, kvw_ptr, kvb_ptr, kv_ptr,
    NKV, BATCH, SPLITS, eps,
    C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    # the partials summed + conv bias + SR LayerNorm, then one BLOCK_N-wide column block of the k/v projection
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < NKV
    co = tl.arange(0, C_PAD)
    co_mask = co < C
    mask = r_mask[:, None] & co_mask[None, :]
    z = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    for split in range(SPLITS):
        rows = (split * BATCH + pid_b) * NKV + r
        z += tl.load(z_ptr + rows[:, None] * C + co[None, :], mask=mask, other=0.0)
    z += tl.load(srb_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(z, axis=1) / C
    zc = tl.where(co_mask[None, :], z - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(zc * zc, axis=1) / C + eps)
    lnw = tl.load(lnw_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    zn = (zc * rstd[:, None] * lnw[None, :] + lnb[None, :]).to(kv_ptr.dtype.element_ty)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < 2 * C
    w2 = tl.load(kvw_ptr + n[None, :] * C + co[:, None], mask=n_mask[None, :] & co_mask[:, None], other=0.0)
    kv = mma(zn, w2, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
    kv += tl.load(kvb_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = pid_b * NKV + r
    tl.store(kv_ptr + out_rows[:, None] * (2 * C) + n[None, :], kv.to(kv_ptr.dtype.element_ty),
             mask=r_mask[:, None] & n_mask[None, :])


def check_sr_input(x_norm, params):
    """(B, N, C) of ``x_norm``, after checking it and ``params`` (an ``SRAttentionParams`` of C channels) for both
    SR-attention launchers (``sr_kv``, ``flash_sr_attention``)."""
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
    B, N, C = check_sr_input(x_norm, params)
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
    launches = sr_kv_launches(B, NKV, C, R, x_norm.dtype)
    upcast = upcast_dot(x_norm.dtype)
    if len(launches) == 1:
        (launch,) = launches
        _sr_kv_kernel[launch.grid](
            x_norm, params.sr_weight, params.sr_bias, params.sr_ln_weight, params.sr_ln_bias,
            params.kv_weight, params.kv_bias, kv,
            H, W, Wkv, NKV, params.sr_eps,
            C=C, R=R, **launch.meta, UPCAST=upcast, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )
        return kv
    patchify, norm_kv = launches
    splits = patchify.grid[1]
    chunks = R * R * triton.cdiv(C, patchify.meta["BLOCK_K"])
    z = torch.empty((splits, B, NKV, C), dtype=torch.float32, device=x_norm.device)
    _sr_patchify_kernel[patchify.grid](
        x_norm, params.sr_weight, z,
        H, W, Wkv, NKV, B, chunks, triton.cdiv(chunks, splits),  # = per_split of sr_kv_launches
        C=C, R=R, **patchify.meta, UPCAST=upcast, num_warps=patchify.num_warps, num_stages=patchify.num_stages,
    )
    _sr_norm_kv_kernel[norm_kv.grid](
        z, params.sr_bias, params.sr_ln_weight, params.sr_ln_bias, params.kv_weight, params.kv_bias, kv,
        NKV, B, splits, params.sr_eps,
        C=C, **norm_kv.meta, UPCAST=upcast, num_warps=norm_kv.num_warps, num_stages=norm_kv.num_stages,
    )
    return kv


def sr_kv_launches(B, NKV, C, R, dtype) -> list:
    """The launches of ``sr_kv`` for R > 1: ``[fused]`` (patchify + LayerNorm + k/v in one kernel, one block per
    BLOCK_M reduced tokens) where that grid has a wave of blocks, else ``[patchify, norm_kv]``: the patchify GEMM
    split over its K = R*R*C reduction into fp32 partials (grid: row blocks x splits x images), then the partials'
    sum + bias + LayerNorm + one column block of the k/v projection per block (grid: row blocks x column blocks x
    images). The reduced grid is short (256 tokens at 512², 2048 at 1024x2048), so at batch 1 only the split
    form fills the GPU. fp32 always takes the fused kernel (the split form's k/v step spills there)."""
    C_PAD = triton.next_power_of_2(C)
    warps = 4 if C_PAD <= 128 else 8

    def fused(block_m):
        return Launch("_sr_kv_kernel", (triton.cdiv(NKV, block_m), B),
                      {"C_PAD": C_PAD, "BLOCK_M": block_m, "BLOCK_K": 32, "BLOCK_N": 64}, warps, 2)

    sizes = (32, 16) if C_PAD <= 256 else (16,)
    if dtype == torch.float32:
        # fp32 dots run on FMA units with both operands in registers: the split form's full-width normalized tile
        # times a k/v column block spilled kilobytes on sm_90, the fused kernel does not
        return [pick_launch(map(fused, sizes), why_fewer="fp32 keeps the fused kernel (the split form spills)")]
    one = pick_launch(map(fused, sizes))
    if not one.reason:
        return [one]
    block_m = 16
    rows = triton.cdiv(NKV, block_m) * B
    chunks = R * R * triton.cdiv(C, 32)
    per_split = max(1, chunks // triton.cdiv(wave_blocks(), rows))  # K chunks per split: a wave where possible
    splits = triton.cdiv(chunks, per_split)  # the last split may be shorter, none is empty
    patchify = pick_launch(
        [Launch("_sr_patchify_kernel", (triton.cdiv(NKV, block_m), splits, B),
                {"C_PAD": C_PAD, "BLOCK_M": block_m, "BLOCK_K": 32}, warps, 2)],
        why_fewer=f"every one of the {chunks} K chunks (tap, 32 channels) is its own split")

    def norm_kv(block_n):  # 16-wide column blocks on 8 warps spilled at C = 160 on Triton 3.6: 4 warps
        return Launch("_sr_norm_kv_kernel", (triton.cdiv(NKV, block_m), triton.cdiv(2 * C, block_n), B),
                      {"C_PAD": C_PAD, "BLOCK_M": block_m, "BLOCK_N": block_n}, 4 if block_n == 16 else warps, 2)

    return [patchify, pick_launch(map(norm_kv, (64, 32, 16)))]


def sr_kv_ref(x_norm, H, W, params, upcast=True):
    """``reference.sr_kv`` (patchify GEMM + SR LayerNorm + k/v projection) in fp32 (fp64 stays fp64) when
    ``upcast``, else in x_norm's dtype. Returns (B, Nkv, 2C)."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return reference.sr_kv(x_norm.to(dt), H, W, params.to(dtype=dt))


__all__ = ["MAX_SR_CHANNELS", "reduced_size", "sr_kv", "sr_kv_launches", "sr_kv_ref"]
