"""Mix-FFN of one SegFormer block: fc1 (C -> 4C) -> depthwise 3x3 conv (padding 1) -> exact GELU -> fc2 (4C -> C).

Tokens are channels-last, row-major over (H, W): h[b, y*W + x, c].

``mixffn(x_norm, H, W, params, residual)``: ``linear`` (fc1) then ``mixffn_fc2`` (in ``mixffn_fc2.py``: fc2 whose
A operand is GELU(dwconv(h)) computed on the fly, + bias + residual; one block owns all C columns so the conv is
computed once, and where that grid is short of a wave the 4C reduction is split over the grid into fp32 partials
summed by a second launch). The 4C-wide activation is written once (by fc1) and read by fc2.

All accumulation in fp32; the GELU output is rounded to the activation dtype before fc2 (as eager does). The
references (``dwconv_gelu_ref``, ``mixffn_fc2_ref``, ``mixffn_ref``) are ``segformer_fast.ops.reference``'s ops in
the reference dtype.
"""

from segformer_fast.kernels.common import ref_dtype
from segformer_fast.kernels.linear import linear
from segformer_fast.kernels.mixffn_fc2 import (
    column_groups,
    dwconv_gelu_ref,
    mixffn_fc2,
    mixffn_fc2_launches,
    mixffn_fc2_ref,
)
from segformer_fast.ops import reference
from segformer_fast.prepared.weights import MixFFNParams, check_tensor


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


def mixffn_ref(x_norm, H, W, params, residual=None, upcast=True):
    """``reference.mixffn`` (fc1, depthwise conv, GELU, fc2, + residual) in fp32 (fp64 stays fp64) when ``upcast``,
    else in x's dtype."""
    dt = ref_dtype(x_norm.dtype, upcast)
    return reference.mixffn(x_norm.to(dt), H, W, params.to(dtype=dt),
                            residual=None if residual is None else residual.to(dt))


def mixffn_flops(B, N, C, C4):
    """Multiply-adds x 2 of one Mix-FFN (fc1, depthwise conv, fc2)."""
    return 2 * B * N * (C * C4 + 9 * C4 + C4 * C)


__all__ = ["column_groups", "dwconv_gelu_ref", "mixffn", "mixffn_fc2", "mixffn_fc2_launches", "mixffn_fc2_ref",
           "mixffn_flops", "mixffn_ref"]
