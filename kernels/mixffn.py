"""Mix-FFN of one SegFormer block: fc1 (C -> 4C) -> depthwise 3x3 conv (padding 1) -> exact GELU -> fc2 (4C -> C).

Tokens are channels-last, row-major over (H, W): h[b, y*W + x, c].

- ``mixffn_fc2(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual)``: fc2 whose A operand is computed on
  the fly as GELU(dwconv(h)) (nine shifted tile loads, served mostly by L1/L2), plus bias and residual in the
  epilogue; the GELU output never exists in memory.

fc2's design: one block owns BLOCK_M tokens and *all* C output columns, held as two power-of-two accumulators
(``column_groups``: 320 = 256 + 64, 160 = 128 + 32, 512 and the others one group). So no column is padded (a
single 512-wide tile for C = 320 computed 192 dead columns) and GELU(dwconv) is computed exactly once per element
(column blocks each recomputed it: twice at C = 320 and 512 with 256-wide blocks). The alternatives were worse
for this op: writing GELU(dwconv) to memory in the compute dtype adds a write and a read of the 4C-wide tensor,
the largest of the block, which this fusion exists to avoid; splitting the 4C reduction across blocks needs fp32
partial sums and a second pass. The cost is fewer blocks at batch 1 on small grids (M / BLOCK_M, e.g. 64 at B5
stage 3, 512², BLOCK_M 16), which ``mixffn_fc2_launch`` states; BLOCK_M shrinks to 16 before that happens, and the
accumulators (BLOCK_M x C in fp32) are kept to 8 Ki elements so they stay in registers.
- ``mixffn(x_norm, H, W, params, residual)``: ``linear`` (fc1) then ``mixffn_fc2``: the 4C-wide activation is
  written once (by fc1) and read by fc2. Two launches.

All accumulation in fp32; the GELU output is rounded to the activation dtype before fc2 (as eager does). The
references (``dwconv_gelu_ref``, ``mixffn_ref``) are ``segformer_fast.ops.reference``'s ops in the reference dtype.
"""

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
)
from segformer_fast.kernels.linear import linear
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import MixFFNParams, check_tensor


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
def _fc2_epilogue(acc, cols, col_mask, g, g_mask, b_ptr, r_ptr, y_ptr, C: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc + bias (+ residual) stored to y[g, cols]."""
    acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    offs = g[:, None] * C + cols[None, :]
    mask = g_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixffn_fc2_kernel(
    h_ptr, dww_ptr, dwb_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, H, W, N, C4,
    C: tl.constexpr, C_HI: tl.constexpr, C_LO: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    # one block owns BLOCK_M tokens and all C output columns, as two power-of-two column groups [0, C_HI) and
    # [C_HI, C_HI + C_LO) (C_LO = 0 when C is a power of two): GELU(dwconv) is computed once per element
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
    for k0 in range(0, C4, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < C4
        a = _dwconv_gelu_tile(h_ptr, dww_ptr, dwb_ptr, g, g_mask, ks, k_mask, H, W, N, C4, BLOCK_M, BLOCK_K)
        a = a.to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + hi[None, :] * C4 + ks[:, None], mask=hi_mask[None, :] & k_mask[:, None], other=0.0)
        acc_hi = mma(a, w, acc_hi, UPCAST)
        if C_LO > 0:
            w = tl.load(w_ptr + lo[None, :] * C4 + ks[:, None], mask=lo_mask[None, :] & k_mask[:, None], other=0.0)
            acc_lo = mma(a, w, acc_lo, UPCAST)
    _fc2_epilogue(acc_hi, hi, hi_mask, g, g_mask, b_ptr, r_ptr, y_ptr, C, HAS_RESIDUAL)
    if C_LO > 0:
        _fc2_epilogue(acc_lo, lo, lo_mask, g, g_mask, b_ptr, r_ptr, y_ptr, C, HAS_RESIDUAL)


def column_groups(C):
    """(C_HI, C_LO): fc2's output columns as a power of two C_HI <= C plus the rest rounded up to a power of two
    (0 when C is one; at least 16 each, tl.dot's smallest). Every SegFormer width is a power of two or a sum of two
    (160 = 128 + 32, 320 = 256 + 64), so no column is padded there."""
    hi = max(16, 1 << (C.bit_length() - 1))
    rest = C - hi
    return hi, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def mixffn_fc2_launch(M, C, C4, dtype) -> Launch:
    """The grid and tiles of ``mixffn_fc2`` for M tokens, C outputs, C4 hidden channels in ``dtype``: one block per
    BLOCK_M tokens owning all C columns; BLOCK_M the largest of 64 / 32 / 16 (at most 32 in fp32, whose dot operands
    also sit in registers) whose fp32 accumulators fit (BLOCK_M x C at most 8 Ki elements) and that gives a wave of
    blocks."""
    hi, lo = column_groups(C)
    width = hi + lo
    largest = 32 if dtype == torch.float32 else 64
    sizes = [bm for bm in (64, 32, 16) if bm <= max(16, min(largest, 8192 // width))]

    def make(block_m):
        # sm_90 compiles without spills (tests/kernels/test_launch_grids.py, Triton 3.6 and current): past 128
        # columns 8 warps, and 16-deep K steps once the tile has 32 rows (32-deep ones spilled at C = 320 / 512)
        wide = width > 128
        return Launch("_mixffn_fc2_kernel", (triton.cdiv(M, block_m),),
                      {"C_HI": hi, "C_LO": lo, "BLOCK_M": block_m,
                       "BLOCK_K": 16 if wide and block_m >= 32 and dtype != torch.float32 else 32},
                      num_warps=8 if wide or block_m * width >= (2048 if dtype == torch.float32 else 8192) else 4,
                      num_stages=2)

    return pick_launch(map(make, sizes), why_fewer="each block owns all C columns, so the depthwise conv + GELU "
                       "is computed once (splitting the columns would recompute it per column block)")


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


def mixffn_fc2(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=None, out=None):
    """``GELU(dwconv(h) + dw_bias) fc2ᵀ + fc2_bias (+ residual)`` with the dwconv + GELU in the A-operand load.

    h: (B, N = H*W, C4) fc1 output; dw_weight: (C4, 1, 3, 3); dw_bias: (C4,); fc2_weight: (C, C4); fc2_bias: (C,);
    residual: (B, N, C) or None; out: optional (B, N, C). Returns (B, N, C) in h's dtype.
    """
    B, N, C4 = _check_hidden(h, H, W, dw_weight, dw_bias)
    check_tensor("fc2_weight", fc2_weight, shape=(None, C4), dtype=h.dtype, device=h.device)
    C = fc2_weight.shape[0]
    check_tensor("fc2_bias", fc2_bias, shape=(C,), dtype=h.dtype, device=h.device)
    if residual is not None:
        check_tensor("residual", residual, shape=(B, N, C), dtype=h.dtype, device=h.device)
    y = check_out(out, (B, N, C), h)
    M = B * N
    if M and C:
        launch = mixffn_fc2_launch(M, C, C4, h.dtype)
        _mixffn_fc2_kernel[launch.grid](
            h, dw_weight, dw_bias, fc2_weight, fc2_bias, residual if residual is not None else y, y,
            M, H, W, N, C4,
            C=C, HAS_RESIDUAL=residual is not None, **launch.meta, UPCAST=upcast_dot(h.dtype),
            num_warps=launch.num_warps, num_stages=launch.num_stages,
        )
    return y


def mixffn(x_norm, H, W, params, residual=None, out=None):
    """One block's Mix-FFN branch plus residual: ``residual + fc2(GELU(dwconv(fc1(x_norm))))``.

    x_norm: (B, N = H*W, C) = LN2(x) tokens; params: ``MixFFNParams`` in x_norm's dtype/device; residual: (B, N, C)
    or None. Returns (B, N, C). Launches: fc1 (``linear``), then ``mixffn_fc2``.
    """
    if not isinstance(params, MixFFNParams):
        raise TypeError(f"params: expected MixFFNParams, got {type(params).__name__}")
    check_tensor("x_norm", x_norm, shape=(None, None, None))
    h = linear(x_norm, params.fc1_weight, params.fc1_bias)
    return mixffn_fc2(h, H, W, params.dw_weight, params.dw_bias, params.fc2_weight, params.fc2_bias,
                      residual=residual, out=out)


def dwconv_gelu_ref(h, H, W, dw_weight, dw_bias, upcast=True):
    """``reference.dwconv_gelu`` (the A operand ``mixffn_fc2`` computes on the fly) in fp32 (fp64 stays fp64) when
    ``upcast``, else in h's dtype. h: (B, H*W, C4) -> (B, H*W, C4)."""
    dt = ref_dtype(h.dtype, upcast)
    return reference.dwconv_gelu(h.to(dt), H, W, dw_weight.to(dt), dw_bias.to(dt))


def mixffn_ref(x_norm, H, W, params, residual=None, upcast=True):
    """``reference.mixffn`` (fc1, depthwise conv, GELU, fc2, + residual) in fp32 (fp64 stays fp64) when ``upcast``,
    else in x's dtype."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return reference.mixffn(x_norm.to(dt), H, W, params.to(dtype=dt),
                            residual=None if residual is None else residual.to(dt))


def mixffn_flops(B, N, C, C4):
    """Multiply-adds x 2 of one Mix-FFN (fc1, depthwise conv, fc2)."""
    return 2 * B * N * (C * C4 + 9 * C4 + C4 * C)
