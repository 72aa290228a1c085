"""Linear layer ``y = x Wᵀ + b (+ residual)`` as a Triton GEMM.

Used for the Mix-FFN fc1, the k/v projection when the SR ratio is 1, and the attention output projection for
widths whose fused epilogue would not fit in registers (see ``sr_attention.py``).
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
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import check_tensor

#: (BLOCK_M, BLOCK_N) tiles, largest first; ``linear_launch`` takes the first that gives a wave of blocks.
TILES = ((64, 128), (64, 64), (32, 64), (32, 32), (16, 32), (16, 16))


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, N, K,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row blocks share each column block of W while it is in L2
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_size
    pid_n = (pid % (GROUP_M * grid_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None], mask=col_mask[None, :] & k_mask[:, None],
                    other=0.0)
        acc = mma(a, w, acc, UPCAST)
    acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    offs = rows64[:, None] * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def linear(x, weight, bias, residual=None, out=None):
    """``y = x Wᵀ + b (+ residual)`` with fp32 accumulation.

    x: (..., K) contiguous; weight: (N, K) (``nn.Linear`` layout); bias: (N,); residual: same shape as y or None;
    out: optional preallocated (..., N). All tensors share x's dtype (fp32/fp16/bf16) and device.
    Returns y: (..., N) in x's dtype.
    """
    check_tensor("x", x)
    check_compute_dtype("x", x)
    check_device("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim (..., K), got shape {tuple(x.shape)}")
    K = x.shape[-1]
    check_tensor("weight", weight, shape=(None, K), dtype=x.dtype, device=x.device)
    N = weight.shape[0]
    check_tensor("bias", bias, shape=(N,), dtype=x.dtype, device=x.device)
    out_shape = (*x.shape[:-1], N)
    if residual is not None:
        check_tensor("residual", residual, shape=out_shape, dtype=x.dtype, device=x.device)
    y = check_out(out, out_shape, x)
    M = x.numel() // K if K else 0
    if M == 0 or N == 0:
        return y
    launch = linear_launch(M, N, K, x.dtype)
    _linear_kernel[launch.grid](
        x, weight, bias, residual if residual is not None else y, y,
        M, N, K,
        HAS_RESIDUAL=residual is not None, **launch.meta, UPCAST=upcast_dot(x.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return y


def linear_launch(M, N, K, dtype) -> Launch:
    """The grid and tiles of ``linear`` for an (M, K) x (K, N) product in ``dtype``: the largest (BLOCK_M, BLOCK_N)
    of ``TILES`` (BLOCK_N at most next_pow2(N)) that gives a wave of blocks."""
    BLOCK_K = max(16, min(64 if dtype != torch.float32 else 32, triton.next_power_of_2(K)))
    widest = max(16, triton.next_power_of_2(N))
    tiles = dict.fromkeys((bm, min(bn, widest)) for bm, bn in TILES)  # ordered, without repeats

    def make(block_m, block_n):
        big = block_m * block_n >= 4096
        return Launch(
            "_linear_kernel", (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),),
            {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": BLOCK_K, "GROUP_M": 8},
            num_warps=8 if dtype == torch.float32 and big else 4, num_stages=3,
        )

    return pick_launch(make(bm, bn) for bm, bn in tiles)


def linear_ref(x, weight, bias, residual=None, upcast=True):
    """``reference.linear`` (``x Wᵀ + b (+ residual)``) in fp32 (fp64 inputs stay fp64) when ``upcast``, else in
    x's dtype."""
    dt = ref_dtype(x.dtype, upcast)
    return reference.linear(x.to(dt), weight.to(dt), bias.to(dt), None if residual is None else residual.to(dt))
