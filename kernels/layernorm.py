"""LayerNorm over channels with fp32 statistics, optionally fused with the residual add or the patch-embed layout.

- ``layer_norm(x, w, b, eps)``: y = LN(x) for tokens x: (..., C).
- ``layer_norm(x, w, b, eps, residual=r)``: s = x + r (rounded to x's dtype, the residual stream the next block
  sees), y = LN(s); returns (y, s).
- ``patch_embed_layer_norm(x, w, b, eps)``: x is the patch-embed conv output (B, C, H, W); returns normalized
  tokens (B, H*W, C) in one pass (the NCHW -> NLC transpose is folded into the loads).

Statistics (mean, then the variance of the centred values) are computed in fp32 for every input dtype, so fp16
inputs of magnitude 1e4 do not overflow (x² would in fp16). One program normalizes BLOCK_T rows of
BLOCK_C = next_power_of_2(C) channels; any C up to 8192 works in one pass (SegFormer uses 32...512). BLOCK_T is
the largest power of two up to 64 rows (8192 elements) that still gives a wave of blocks (``layer_norm_launch``);
the patch-embed variant keeps at least 16 tokens per block, its contiguous axis, so its loads stay coalesced.
"""

import triton
import triton.language as tl

from segformer_fast.kernels.common import Launch, check_compute_dtype, check_device, check_out, pick_launch, ref_dtype
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import check_tensor

MAX_CHANNELS = 8192


@triton.jit
def _layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr,
    T, C, x_stride_b, x_stride_t, x_stride_c, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (t < T)[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + pid_b * x_stride_b + t[:, None] * x_stride_t + c[None, :] * x_stride_c,
                mask=mask, other=0.0).to(tl.float32)
    offs = (pid_b * T + t[:, None]) * C + c[None, :]
    if HAS_RESIDUAL:
        s = (x + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check_params(x, C, weight, bias, eps):
    check_tensor("weight", weight, shape=(C,), dtype=x.dtype, device=x.device)
    check_tensor("bias", bias, shape=(C,), dtype=x.dtype, device=x.device)
    if not float(eps) > 0.0:
        raise ValueError(f"eps: expected a positive number, got {eps}")
    if C > MAX_CHANNELS:
        raise ValueError(f"x: expected at most {MAX_CHANNELS} channels, got {C}")


def layer_norm_launch(T, C, batch=1, *, patch_embed=False) -> Launch:
    """The grid and tiles of ``layer_norm`` (T rows of C; ``batch`` 1) or of ``patch_embed_layer_norm`` (T = H*W
    tokens per image, ``batch`` images): BLOCK_T from the largest (64 rows, at most 8192 elements; 128 tokens for
    the patch embed) down to 1 (16 for the patch embed) until the grid has a wave of blocks."""
    BLOCK_C = triton.next_power_of_2(C)
    largest = max(1, min(128 if patch_embed else 64, 8192 // BLOCK_C))
    smallest = min(16, largest) if patch_embed else 1
    sizes = []
    block_t = largest
    while block_t >= smallest:
        sizes.append(block_t)
        block_t //= 2
    if patch_embed and largest < 16:
        sizes = [16]  # tokens are the contiguous axis here: keep the loads coalesced

    def make(block_t):
        return Launch("_layer_norm_kernel", (triton.cdiv(T, block_t), batch),
                      {"BLOCK_T": block_t, "BLOCK_C": BLOCK_C},
                      num_warps=8 if block_t * BLOCK_C >= 8192 else 4, num_stages=3)

    return pick_launch(map(make, sizes))


def layer_norm(x, weight, bias, eps, residual=None, out=None, out_sum=None):
    """LayerNorm over the last dim, statistics in fp32; optionally of ``x + residual``.

    x: (..., C) contiguous fp32/fp16/bf16; weight, bias: (C,) in x's dtype; residual: like x or None;
    out / out_sum: optional preallocated results (like x).
    Returns y (like x), or (y, s) with s = x + residual when ``residual`` is given.
    """
    check_tensor("x", x)
    check_compute_dtype("x", x)
    check_device("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim (..., C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    _check_params(x, C, weight, bias, eps)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), dtype=x.dtype, device=x.device)
    elif out_sum is not None:
        raise ValueError("out_sum: given without residual (the sum x + residual exists only with a residual)")
    y = check_out(out, tuple(x.shape), x)
    s = check_out(out_sum, tuple(x.shape), x) if residual is not None else y
    T = x.numel() // C if C else 0
    if T:
        launch = layer_norm_launch(T, C)
        _layer_norm_kernel[launch.grid](
            x, residual if residual is not None else x, weight, bias, y, s,
            T, C, 0, C, 1, float(eps),
            HAS_RESIDUAL=residual is not None, **launch.meta, num_warps=launch.num_warps,
        )
    return (y, s) if residual is not None else y


def patch_embed_layer_norm(x, weight, bias, eps, out=None):
    """LayerNorm of the patch-embed conv output, written as tokens.

    x: (B, C, H, W) contiguous (the conv output); weight, bias: (C,) in x's dtype; out: optional (B, H*W, C).
    Returns (B, H*W, C) tokens, row-major over (H, W).
    """
    check_tensor("x", x, shape=(None, None, None, None))
    check_compute_dtype("x", x)
    check_device("x", x)
    B, C, H, W = x.shape
    _check_params(x, C, weight, bias, eps)
    T = H * W
    y = check_out(out, (B, T, C), x)
    if B and T and C:
        launch = layer_norm_launch(T, C, B, patch_embed=True)
        _layer_norm_kernel[launch.grid](
            x, x, weight, bias, y, y,
            T, C, C * T, 1, T, float(eps),
            HAS_RESIDUAL=False, **launch.meta, num_warps=launch.num_warps,
        )
    return y


def layer_norm_ref(x, weight, bias, eps, residual=None, upcast=True):
    """``reference.layer_norm`` in fp32 (fp64 inputs stay fp64) when ``upcast``, else in x's dtype.

    Returns y, or (y, s) with s = x + residual. With ``upcast`` the sum is not rounded to x's dtype.
    """
    dt = ref_dtype(x.dtype, upcast)
    return reference.layer_norm(x.to(dt), weight.to(dt), bias.to(dt), eps,
                                residual=None if residual is None else residual.to(dt))


def patch_embed_layer_norm_ref(x, weight, bias, eps, upcast=True):
    """``reference.patch_embed_layer_norm`` ((B, C, H, W) -> LN over C of (B, H*W, C) tokens), in fp32 (fp64 stays
    fp64) when ``upcast``, else in x's dtype."""
    dt = ref_dtype(x.dtype, upcast)
    return reference.patch_embed_layer_norm(x.to(dt), weight.to(dt), bias.to(dt), eps)
