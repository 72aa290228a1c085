"""fc2 of a Mix-FFN with the depthwise 3x3 conv + bias + exact GELU in its operand load (``mixffn_fc2``), the
second half of ``mixffn.py``'s op.

    y = GELU(dwconv3x3(h) + dw_bias) fc2ᵀ + fc2_bias (+ residual)

h is the fc1 output (B, N = H*W, C4), channels-last tokens row-major over (H, W). The A operand is computed on the
fly (nine shifted tile loads, served mostly by L1/L2) and rounded to the activation dtype before the dot, as eager
rounds the GELU output; the GELU output never exists in memory.

One block owns BLOCK_M tokens and *all* C output columns, held as two power-of-two accumulators
(``column_groups``: 320 = 256 + 64, 160 = 128 + 32, 512 and the others one group). So no column is padded (a
single 512-wide tile for C = 320 computed 192 dead columns) and GELU(dwconv) is computed exactly once per element
(column blocks each recomputed it: twice at C = 320 and 512 with 256-wide blocks). Writing GELU(dwconv) to memory
instead would add a write and a read of the 4C-wide tensor, the largest of the block, which this fusion avoids.
BLOCK_M shrinks to 16 before the grid gets short, and the accumulators (BLOCK_M x C in fp32) are kept to 8 Ki
elements so they stay in registers. ``mixffn_fc2_launches`` computes the launches:

- where M / BLOCK_M blocks make a wave (132), one launch of ``_mixffn_fc2_kernel`` (SPLIT False): K loop over all
  C4 hidden channels, + bias + residual in the epilogue;
- otherwise (small grids at batch 1: B5 stage 3 at 512² has 64 row blocks, stage 4 16) the 4C reduction is split
  over a second grid axis: ``_mixffn_fc2_kernel`` (SPLIT True) computes GELU(dwconv) of its K slice for its
  tokens and all C columns (still once per element) and writes fp32 partials, and ``_mixffn_fc2_sum_kernel``
  sums them in split order + bias + residual and rounds to the output dtype. A second launch rather than atomics
  or a last-block fix-up: the sum is deterministic (fixed order, no float atomics) and needs no counters to
  reset between CUDA-graph replays; it costs one small launch and the partials' write and read (L2-sized).

All accumulation in fp32. ``mixffn_fc2_ref`` and ``dwconv_gelu_ref`` are ``segformer_fast.ops.reference``'s ops
in the reference dtype.
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
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import check_tensor


@triton.jit
def _dwconv_gelu_tile(h_ptr, w_ptr, b_ptr, g, g_mask, c, c_mask, H, W, N, C4,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 GELU(dwconv3x3(h) + bias) at global tokens g (int64, b*N + y*W + x) and channels c."""
    t = g % N
    y = t // W
    x = t % W
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for tap in tl.static_range(9):
        ny = y + (tap // 3 - 1)
        nx = x + (tap % 3 - 1)
        valid = g_mask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        src = g + ((tap // 3 - 1) * W + (tap % 3 - 1))
        v = tl.load(h_ptr + src[:, None] * C4 + c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + c * 9 + tap, mask=c_mask, other=0.0)
        acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    acc += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))


@triton.jit
def _fc2_store(acc, cols, col_mask, g, g_mask, b_ptr, r_ptr, y_ptr, M,
               C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr):
    """SPLIT: the fp32 partial acc stored to y[split, g, cols]; else acc + bias (+ residual) stored to y[g, cols]."""
    mask = g_mask[:, None] & col_mask[None, :]
    if SPLIT:
        rows = tl.program_id(1).to(tl.int64) * M + g
        tl.store(y_ptr + rows[:, None] * C + cols[None, :], acc, mask=mask)
    else:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        offs = g[:, None] * C + cols[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixffn_fc2_kernel(
    h_ptr, dww_ptr, dwb_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, H, W, N, C4, K_CHUNKS, SPLITS,
    C: tl.constexpr, C_HI: tl.constexpr, C_LO: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    # one block owns BLOCK_M tokens and all C output columns, as two power-of-two column groups [0, C_HI) and
    # [C_HI, C_HI + C_LO) (C_LO = 0 when C is a power of two): GELU(dwconv) is computed once per element.
    # SPLIT: block (m, s) sums the K chunks [s * K_CHUNKS // SPLITS, (s + 1) * K_CHUNKS // SPLITS) (BLOCK_K hidden
    # channels each; the splits differ by at most one chunk) into fp32 partials y[s] (y is then (SPLITS, M, C))
    pid_m = tl.program_id(0)
    g = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    g_mask = g < M
    hi = tl.arange(0, C_HI)
    hi_mask = hi < C
    acc_hi = tl.zeros([BLOCK_M, C_HI], dtype=tl.float32)
    if C_LO > 0:
        lo = C_HI + tl.arange(0, C_LO)
        lo_mask = lo < C
        acc_lo = tl.zeros([BLOCK_M, C_LO], dtype=tl.float32)
    if SPLIT:
        pid_s = tl.program_id(1)
        k_start = (pid_s * K_CHUNKS // SPLITS) * BLOCK_K
        k_stop = tl.minimum(((pid_s + 1) * K_CHUNKS // SPLITS) * BLOCK_K, C4)
    else:
        k_start = 0
        k_stop = C4
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < C4
        a = _dwconv_gelu_tile(h_ptr, dww_ptr, dwb_ptr, g, g_mask, ks, k_mask, H, W, N, C4, BLOCK_M, BLOCK_K)
        a = a.to(h_ptr.dtype.element_ty)  # rounded as eager rounds the GELU output
        w = tl.load(w_ptr + hi[None, :] * C4 + ks[:, None], mask=hi_mask[None, :] & k_mask[:, None], other=0.0)
        acc_hi = mma(a, w, acc_hi, UPCAST)
        if C_LO > 0:
            w = tl.load(w_ptr + lo[None, :] * C4 + ks[:, None], mask=lo_mask[None, :] & k_mask[:, None], other=0.0)
            acc_lo = mma(a, w, acc_lo, UPCAST)
    _fc2_store(acc_hi, hi, hi_mask, g, g_mask, b_ptr, r_ptr, y_ptr, M, C, HAS_RESIDUAL, SPLIT)
    if C_LO > 0:
        _fc2_store(acc_lo, lo, lo_mask, g, g_mask, b_ptr, r_ptr, y_ptr, M, C, HAS_RESIDUAL, SPLIT)


@triton.jit
def _mixffn_fc2_sum_kernel(p_ptr, b_ptr, r_ptr, y_ptr, MC, SPLITS,
                           C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # y = (p[0] + p[1] + ... + p[SPLITS - 1]) + bias (+ residual), flat over the M * C outputs, rounded once
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MC
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = p_ptr + offs
    for _ in range(SPLITS):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += MC
    acc += tl.load(b_ptr + offs % C, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def column_groups(C):
    """(C_HI, C_LO): fc2's output columns as a power of two C_HI <= C plus the rest rounded up to a power of two
    (0 when C is one; at least 16 each, tl.dot's smallest). Every SegFormer width is a power of two or a sum of two
    (160 = 128 + 32, 320 = 256 + 64), so no column is padded there."""
    hi = max(16, 1 << (C.bit_length() - 1))
    rest = C - hi
    return hi, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def mixffn_fc2_launches(M, C, C4, dtype, split=True) -> list:
    """The launches of ``mixffn_fc2`` for M tokens, C outputs, C4 hidden channels in ``dtype``.

    ``[fc2]``, one block per BLOCK_M tokens owning all C columns, where that grid has a wave of blocks: BLOCK_M the
    largest of 64 / 32 / 16 (at most 32 in fp32, whose dot operands also sit in registers) whose fp32 accumulators
    fit (BLOCK_M x C at most 8 Ki elements) and that gives a wave. Otherwise ``[fc2 split, sum]``: the smallest
    tiles with the 4C reduction split into the fewest K slices that give a wave (grid: row blocks x splits; at most
    one split per K chunk), then the partials' sum + bias + residual (grid: BLOCK outputs per block). Only a C4
    of one K chunk keeps the short single launch (nothing to split), and so does ``split=False`` (the baseline
    that benchmarks/bench_kernels.py measures the split against)."""
    hi, lo = column_groups(C)
    width = hi + lo
    largest = 32 if dtype == torch.float32 else 64
    sizes = [bm for bm in (64, 32, 16) if bm <= max(16, min(largest, 8192 // width))]

    def meta(block_m):
        # sm_90 compiles without spills (tests/kernels/test_launch_grids.py, Triton 3.6 and current): past 128
        # columns 8 warps, and 16-deep K steps once the tile has 32 rows (32-deep ones spilled at C = 320 / 512)
        wide = width > 128
        return ({"C_HI": hi, "C_LO": lo, "BLOCK_M": block_m,
                 "BLOCK_K": 16 if wide and block_m >= 32 and dtype != torch.float32 else 32},
                8 if wide or block_m * width >= (2048 if dtype == torch.float32 else 8192) else 4)

    def single(block_m):
        tiles, warps = meta(block_m)
        return Launch("_mixffn_fc2_kernel", (triton.cdiv(M, block_m),), {**tiles, "SPLIT": False}, warps, 2)

    one = pick_launch(map(single, sizes))
    rows = one.grid[0]
    chunks = triton.cdiv(C4, one.meta["BLOCK_K"])
    splits = min(chunks, triton.cdiv(wave_blocks(), rows))
    if not one.reason:
        return [one]
    if splits == 1 or not split:
        why = "the hidden channels are one K chunk (nothing to split)" if split else "split=False"
        return [dataclasses.replace(one, reason=f"{one.reason}: each block owns all C columns, so the depthwise "
                                    f"conv + GELU is computed once, and {why}")]
    # 8 warps at every width: with 4 the 16-row split tile spilled at C = 32 / 64 on sm_90 (Triton 3.6 and 3.9)
    partials = pick_launch([Launch("_mixffn_fc2_kernel", (rows, splits), {**one.meta, "SPLIT": True}, 8, 2)],
                           why_fewer=f"each of the {chunks} K chunks ({one.meta['BLOCK_K']} hidden channels) is "
                           "its own split, and each block owns all C columns so the depthwise conv + GELU is computed "
                           "once")
    total = M * C
    partial_sum = pick_launch(Launch("_mixffn_fc2_sum_kernel", (triton.cdiv(total, block),), {"BLOCK": block}, 4, 2)
                              for block in (1024, 512, 256, 128))
    return [partials, partial_sum]


def _check_hidden(h, H, W, dw_weight, dw_bias):
    check_tensor("h", h, shape=(None, None, None))
    check_compute_dtype("h", h)
    check_device("h", h)
    B, N, C4 = h.shape
    if H < 1 or W < 1 or H * W != N:
        raise ValueError(f"H, W: expected H * W == N={N} with H, W >= 1, got H={H}, W={W}")
    check_tensor("dw_weight", dw_weight, shape=(C4, 1, 3, 3), dtype=h.dtype, device=h.device)
    check_tensor("dw_bias", dw_bias, shape=(C4,), dtype=h.dtype, device=h.device)
    return B, N, C4


def mixffn_fc2(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=None, out=None, split=True):
    """``GELU(dwconv(h) + dw_bias) fc2ᵀ + fc2_bias (+ residual)`` with the dwconv + GELU in the A-operand load.

    h: (B, N = H*W, C4) fc1 output; dw_weight: (C4, 1, 3, 3); dw_bias: (C4,); fc2_weight: (C, C4); fc2_bias: (C,);
    residual: (B, N, C) or None; out: optional (B, N, C); split: False keeps one launch on short grids too (see
    ``mixffn_fc2_launches``). Returns (B, N, C) in h's dtype.
    """
    B, N, C4 = _check_hidden(h, H, W, dw_weight, dw_bias)
    check_tensor("fc2_weight", fc2_weight, shape=(None, C4), dtype=h.dtype, device=h.device)
    C = fc2_weight.shape[0]
    check_tensor("fc2_bias", fc2_bias, shape=(C,), dtype=h.dtype, device=h.device)
    if residual is not None:
        check_tensor("residual", residual, shape=(B, N, C), dtype=h.dtype, device=h.device)
    y = check_out(out, (B, N, C), h)
    M = B * N
    if not (M and C):
        return y
    launches = mixffn_fc2_launches(M, C, C4, h.dtype, split)
    fc2 = launches[0]
    splits = fc2.grid[1] if fc2.meta["SPLIT"] else 1
    has_residual = residual is not None
    # the first kernel writes y itself, or the fp32 partials (splits, M, C) that the second one sums into y
    fc2_out = y if splits == 1 else torch.empty((splits, M, C), dtype=torch.float32, device=h.device)
    _mixffn_fc2_kernel[fc2.grid](
        h, dw_weight, dw_bias, fc2_weight, fc2_bias, residual if has_residual else y, fc2_out,
        M, H, W, N, C4, triton.cdiv(C4, fc2.meta["BLOCK_K"]), splits,
        C=C, HAS_RESIDUAL=has_residual, **fc2.meta, UPCAST=upcast_dot(h.dtype),
        num_warps=fc2.num_warps, num_stages=fc2.num_stages,
    )
    if splits > 1:
        partial_sum = launches[1]
        _mixffn_fc2_sum_kernel[partial_sum.grid](
            fc2_out, fc2_bias, residual if has_residual else y, y, M * C, splits,
            C=C, HAS_RESIDUAL=has_residual, **partial_sum.meta,
            num_warps=partial_sum.num_warps, num_stages=partial_sum.num_stages,
        )
    return y


def dwconv_gelu_ref(h, H, W, dw_weight, dw_bias, upcast=True):
    """``reference.dwconv_gelu`` (the A operand ``mixffn_fc2`` computes on the fly) in fp32 (fp64 stays fp64) when
    ``upcast``, else in h's dtype. h: (B, H*W, C4) -> (B, H*W, C4)."""
    dt = ref_dtype(h.dtype, upcast)
    return reference.dwconv_gelu(h.to(dt), H, W, dw_weight.to(dt), dw_bias.to(dt))


def mixffn_fc2_ref(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=None, upcast=True):
    """``reference.dwconv_gelu`` then ``reference.linear`` (fc2 + bias + residual) in fp32 (fp64 stays fp64) when
    ``upcast``, else in h's dtype (the GELU output rounded to it, as eager does). Returns (B, H*W, C)."""
    dt = ref_dtype(h.dtype, upcast)
    act = dwconv_gelu_ref(h, H, W, dw_weight, dw_bias, upcast)
    return reference.linear(act, fc2_weight.to(dt), fc2_bias.to(dt), None if residual is None else residual.to(dt))


__all__ = ["column_groups", "dwconv_gelu_ref", "mixffn_fc2", "mixffn_fc2_launches", "mixffn_fc2_ref"]
