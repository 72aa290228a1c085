"""The encoder's weights prepared once for the fused paths, and the argument checks they share.

``SRAttentionParams`` / ``MixFFNParams`` hold one block's attention and Mix-FFN weights; ``NormParams``,
``BlockParams`` and ``StageParams`` assemble them into the engine's stages (``prepare_stages``).

Triton-free on purpose: the engine's CPU path and the Triton kernels (``segformer_fast.kernels``) use the same
prepared parameters, so both compute from one set of folds (attention scale in q, merged k/v, SR conv as a GEMM).
It imports torch only (a reference model is read through its modules' attributes).
"""

import dataclasses

import torch


def check_tensor(name, tensor, shape=None, dtype=None, device=None, contiguous=True):
    """Validate one launcher argument; ``shape`` entries that are None match any size.

    Raises TypeError for a non-tensor or a wrong dtype and ValueError for a wrong rank, size, device or layout;
    every message names the argument and gives the expected and the actual values.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if shape is not None:
        if tensor.dim() != len(shape):
            raise ValueError(
                f"{name}: expected {len(shape)} dims with shape {_shape_str(shape)}, "
                f"got {tensor.dim()} dims with shape {tuple(tensor.shape)}"
            )
        for axis, (want, got) in enumerate(zip(shape, tensor.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name}: expected shape {_shape_str(shape)}, got {tuple(tensor.shape)} "
                    f"(dim {axis}: expected {want}, got {got})"
                )
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name}: expected device {device}, got {tensor.device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got shape {tuple(tensor.shape)} with strides {tensor.stride()}"
        )


def _shape_str(shape):
    return str(tuple("*" if s is None else s for s in shape)).replace("'", "")


@dataclasses.dataclass(frozen=True)
class SRAttentionParams:
    """Weights of one SR attention, prepared once (``prepare_sr_attention_params``), all in the compute dtype.

    q_weight (C, C), q_bias (C,): Wq, bq already multiplied by d^-0.5 (``nn.Linear`` layout: (out, in)).
    kv_weight (2C, C), kv_bias (2C,): rows [0, C) are Wk, rows [C, 2C) are Wv (the official ``kv`` Linear).
    o_weight (C, C), o_bias (C,): output projection.
    sr_weight (C, R*R*C): the SR conv weight (C_out, C_in, R, R) permuted to (C_out, R, R, C_in) and flattened,
        so column (ky*R + kx)*C + c multiplies input channel c at patch offset (ky, kx). None when R == 1.
    sr_bias, sr_ln_weight, sr_ln_bias (C,): conv bias and SR LayerNorm affine; None when R == 1.
    sr_eps: SR LayerNorm eps. num_heads, sr_ratio: ints.
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    kv_weight: torch.Tensor
    kv_bias: torch.Tensor
    o_weight: torch.Tensor
    o_bias: torch.Tensor
    sr_weight: torch.Tensor | None
    sr_bias: torch.Tensor | None
    sr_ln_weight: torch.Tensor | None
    sr_ln_bias: torch.Tensor | None
    sr_eps: float
    num_heads: int
    sr_ratio: int

    @property
    def channels(self) -> int:
        return self.q_weight.shape[0]

    @property
    def head_dim(self) -> int:
        return self.channels // self.num_heads

    def to(self, dtype=None, device=None):
        """A copy with every tensor moved to ``dtype`` / ``device``."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device=device, dtype=dtype).contiguous()
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)
        })


def prepare_sr_attention_params(q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, sr_w, sr_b, sr_ln_w, sr_ln_b, sr_eps,
                                num_heads, dtype=None, device=None):
    """Fold and lay out one block's attention weights for the kernels.

    q_w, k_w, v_w, o_w: (C, C) and q_b, k_b, v_b, o_b: (C,) (``nn.Linear`` layout); sr_w: (C, C, R, R) conv
    weight, sr_b: (C,), sr_ln_w / sr_ln_b: (C,) SR LayerNorm (all four None when R == 1); sr_eps: float.
    The scale d^-0.5 is folded into q in fp64, then everything is cast to ``dtype`` (default: q_w's dtype).
    Returns an ``SRAttentionParams``.
    """
    C = q_w.shape[0]
    for name, w in (("q_w", q_w), ("k_w", k_w), ("v_w", v_w), ("o_w", o_w)):
        check_tensor(name, w, shape=(C, C), contiguous=False)
    for name, b in (("q_b", q_b), ("k_b", k_b), ("v_b", v_b), ("o_b", o_b)):
        check_tensor(name, b, shape=(C,), contiguous=False)
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads: expected a divisor of C={C}, got {num_heads}")
    dtype = dtype or q_w.dtype
    device = device or q_w.device
    scale = (C // num_heads) ** -0.5

    def cast(t):
        return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

    if sr_w is None:
        sr_ratio, sr_weight = 1, None
    else:
        sr_ratio = sr_w.shape[-1]
        check_tensor("sr_w", sr_w, shape=(C, C, sr_ratio, sr_ratio), contiguous=False)
        for name, t in (("sr_b", sr_b), ("sr_ln_w", sr_ln_w), ("sr_ln_b", sr_ln_b)):
            check_tensor(name, t, shape=(C,), contiguous=False)
        sr_weight = sr_w.detach().permute(0, 2, 3, 1).reshape(C, sr_ratio * sr_ratio * C)
    return SRAttentionParams(
        q_weight=cast(q_w.detach().double() * scale),
        q_bias=cast(q_b.detach().double() * scale),
        kv_weight=cast(torch.cat([k_w.detach(), v_w.detach()], 0)),
        kv_bias=cast(torch.cat([k_b.detach(), v_b.detach()], 0)),
        o_weight=cast(o_w),
        o_bias=cast(o_b),
        sr_weight=cast(sr_weight),
        sr_bias=cast(sr_b) if sr_ratio > 1 else None,
        sr_ln_weight=cast(sr_ln_w) if sr_ratio > 1 else None,
        sr_ln_bias=cast(sr_ln_b) if sr_ratio > 1 else None,
        sr_eps=float(sr_eps),
        num_heads=int(num_heads),
        sr_ratio=int(sr_ratio),
    )


@dataclasses.dataclass(frozen=True)
class MixFFNParams:
    """Mix-FFN weights in the compute dtype (``prepare_mixffn_params``).

    fc1_weight (C4, C), fc1_bias (C4,); dw_weight (C4, 1, 3, 3), dw_bias (C4,); fc2_weight (C, C4), fc2_bias (C,).
    """

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    dw_weight: torch.Tensor
    dw_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor

    def to(self, dtype=None, device=None):
        """A copy with every tensor moved to ``dtype`` / ``device``."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device=device, dtype=dtype).contiguous() for f in dataclasses.fields(self)
        })


def prepare_mixffn_params(fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b, dtype=None, device=None):
    """Check shapes and cast one block's Mix-FFN weights (``nn.Linear`` / ``nn.Conv2d`` layouts) to ``dtype``."""
    C4, C = fc1_w.shape
    check_tensor("fc1_w", fc1_w, shape=(C4, C), contiguous=False)
    check_tensor("fc1_b", fc1_b, shape=(C4,), contiguous=False)
    check_tensor("dw_w", dw_w, shape=(C4, 1, 3, 3), contiguous=False)
    check_tensor("dw_b", dw_b, shape=(C4,), contiguous=False)
    check_tensor("fc2_w", fc2_w, shape=(C, C4), contiguous=False)
    check_tensor("fc2_b", fc2_b, shape=(C,), contiguous=False)
    return MixFFNParams(fc1_w.detach(), fc1_b.detach(), dw_w.detach(), dw_b.detach(), fc2_w.detach(),
                        fc2_b.detach()).to(dtype=dtype or fc1_w.dtype, device=device or fc1_w.device)


@dataclasses.dataclass
class NormParams:
    """One LayerNorm: weight, bias (C,) in the compute dtype; eps: float."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


@dataclasses.dataclass
class BlockParams:
    """One encoder block: ``x = x + attn(norm1(x))``, then ``x = x + mlp(norm2(x))``."""

    norm1: NormParams
    attn: SRAttentionParams
    norm2: NormParams
    mlp: MixFFNParams


@dataclasses.dataclass
class StageParams:
    """One encoder stage: the overlapping patch-embed conv + its LayerNorm, the blocks, the stage-final LayerNorm.

    patch_weight (C, C_in, k, k), patch_bias (C,): the conv, applied with ``stride`` and ``padding`` (ints).
    blocks: list of ``BlockParams``.
    """

    patch_weight: torch.Tensor
    patch_bias: torch.Tensor
    stride: int
    padding: int
    patch_norm: NormParams
    blocks: list
    norm: NormParams


@torch.no_grad()
def prepare_stages(reference, dtype: torch.dtype, device) -> list:
    """The four ``StageParams`` of a reference ``Segformer`` (read through its modules' attributes), in ``dtype``
    on ``device``: attention weights folded and laid out by ``prepare_sr_attention_params``, Mix-FFN weights by
    ``prepare_mixffn_params``, the rest cast."""

    def cast(tensor):
        return tensor.detach().to(device=device, dtype=dtype).contiguous()

    def norm(module):
        return NormParams(cast(module.weight), cast(module.bias), float(module.eps))

    stages = []
    for stage in reference.stages:
        blocks = []
        for block in stage.blocks:
            attn, mlp = block.attn, block.mlp
            has_sr = attn.sr_ratio > 1
            blocks.append(BlockParams(
                norm1=norm(block.norm1),
                attn=prepare_sr_attention_params(
                    attn.q.weight, attn.q.bias, attn.k.weight, attn.k.bias, attn.v.weight, attn.v.bias,
                    attn.proj.weight, attn.proj.bias,
                    attn.sr.weight if has_sr else None, attn.sr.bias if has_sr else None,
                    attn.sr_norm.weight if has_sr else None, attn.sr_norm.bias if has_sr else None,
                    attn.sr_norm.eps if has_sr else 0.0, attn.num_heads, dtype=dtype, device=device,
                ),
                norm2=norm(block.norm2),
                mlp=prepare_mixffn_params(mlp.fc1.weight, mlp.fc1.bias, mlp.dwconv.weight, mlp.dwconv.bias,
                                          mlp.fc2.weight, mlp.fc2.bias, dtype=dtype, device=device),
            ))
        conv = stage.patch_embed.proj
        stages.append(StageParams(
            patch_weight=cast(conv.weight), patch_bias=cast(conv.bias), stride=conv.stride[0],
            padding=conv.padding[0], patch_norm=norm(stage.patch_embed.norm), blocks=blocks, norm=norm(stage.norm),
        ))
    return stages
