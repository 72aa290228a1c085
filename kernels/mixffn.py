"""Mix-FFN of one SegFormer block: fc1 (C -> 4C) -> depthwise 3x3 conv (padding 1) -> exact GELU -> fc2 (4C -> C).

Tokens are channels-last, row-major over (H, W): h[b, y*W + x, c].

- ``mixffn_fc2(h, H, W, dw_weight, dw_bias, fc2_weight, fc2_bias, residual)``: fc2 whose A operand is computed on
  the fly as GELU(dwconv(h)) (nine shifted tile loads, served mostly by L1/L2), plus bias and residual in the
  epilogue; the GELU output never exists in memory.
- ``mixffn(x_norm, H, W, params, residual)``: ``linear`` (fc1) then ``mixffn_fc2``: the 4C-wide activation is
  written once (by fc1) and read by fc2. Two launches.

All accumulation in fp32; the GELU output is rounded to the activation dtype before fc2 (as eager does). The
references (``dwconv_gelu_ref``, ``mixffn_ref``) are ``segformer_fast.ops.reference``'s ops in the reference dtype.
"""

import torch
import triton
import triton.language as tl

from segformer_fast.ops import reference as torch_ops
from segformer_fast.prepared.weights import MixFFNParams, check_tensor

from .common import check_compute_dtype, check_device, check_out, mma, ref_dtype, upcast_dot
from .linear import linear


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
def _mixffn_fc2_kernel(
    h_ptr, dww_ptr, dwb_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, H, W, N, C, C4,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    g_mask = g < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C4, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < C4
        a = _dwconv_gelu_tile(h_ptr, dww_ptr, dwb_ptr, g, g_mask, ks, k_mask, H, W, N, C4, BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + cols[None, :] * C4 + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = mma(a.to(y_ptr.dtype.element_ty), w, acc, UPCAST)
    acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    offs = g[:, None] * C + cols[None, :]
    mask = g_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


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
        # fp32 dots run on FMA units with the operands in registers: half the rows keeps them from spilling
        BLOCK_M = 32 if h.dtype == torch.float32 else 64
        BLOCK_K = 32
        BLOCK_N = max(16, min(256, triton.next_power_of_2(C)))
        _mixffn_fc2_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_N))](
            h, dw_weight, dw_bias, fc2_weight, fc2_bias, residual if residual is not None else y, y,
            M, H, W, N, C, C4,
            HAS_RESIDUAL=residual is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=upcast_dot(h.dtype),
            num_warps=8 if BLOCK_N >= 128 else 4, num_stages=2,
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
    """``torch_ops.dwconv_gelu`` (the A operand ``mixffn_fc2`` computes on the fly) in fp32 (fp64 stays fp64) when
    ``upcast``, else in h's dtype. h: (B, H*W, C4) -> (B, H*W, C4)."""
    dt = ref_dtype(h.dtype, upcast)
    return torch_ops.dwconv_gelu(h.to(dt), H, W, dw_weight.to(dt), dw_bias.to(dt))


def mixffn_ref(x_norm, H, W, params, residual=None, upcast=True):
    """``torch_ops.mixffn`` (fc1, depthwise conv, GELU, fc2, + residual) in fp32 (fp64 stays fp64) when ``upcast``,
    else in x's dtype."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return torch_ops.mixffn(x_norm.to(dt), H, W, params.to(dtype=dt),
                            residual=None if residual is None else residual.to(dt))


def mixffn_flops(B, N, C, C4):
    """Multiply-adds x 2 of one Mix-FFN (fc1, depthwise conv, fc2)."""
    return 2 * B * N * (C * C4 + 9 * C4 + C4 * C)
