"""Fused Triton kernels for the SegFormer encoder, installed as ``segformer_fast.kernels``.

One file per fused op, each with its eager ``*_ref`` beside it:

- ``layernorm``: ``layer_norm`` (optionally fused with the residual add), ``patch_embed_layer_norm``.
- ``sr_attention``: ``sr_attention`` = ``sr_kv`` (patchify + SR LayerNorm + k/v) + ``flash_sr_attention``
  (q projection, online softmax, output projection + residual), on weights from ``prepare_sr_attention_params``.
- ``mixffn``: ``mixffn`` = fc1 (``linear``) + ``mixffn_fc2`` (dwconv + GELU in fc2's operand load); ``dwconv_gelu``.
- ``linear``: ``linear`` (GEMM + bias + optional residual).

Set ``TRITON_INTERPRET=1`` before importing triton to run the kernels on CPU tensors (slow; for tests).
"""

from .layernorm import layer_norm, layer_norm_ref, patch_embed_layer_norm, patch_embed_layer_norm_ref
from .linear import linear, linear_ref
from .mixffn import (
    MixFFNParams,
    dwconv_gelu,
    dwconv_gelu_ref,
    mixffn,
    mixffn_fc2,
    mixffn_ref,
    prepare_mixffn_params,
)
from .sr_attention import (
    SRAttentionParams,
    flash_sr_attention,
    prepare_sr_attention_params,
    reduced_size,
    sr_attention,
    sr_attention_ref,
    sr_kv,
    sr_kv_ref,
)

__all__ = [
    "layer_norm", "layer_norm_ref", "patch_embed_layer_norm", "patch_embed_layer_norm_ref",
    "linear", "linear_ref",
    "MixFFNParams", "prepare_mixffn_params", "dwconv_gelu", "dwconv_gelu_ref", "mixffn", "mixffn_fc2", "mixffn_ref",
    "SRAttentionParams", "prepare_sr_attention_params", "reduced_size", "sr_kv", "sr_kv_ref", "flash_sr_attention",
    "sr_attention", "sr_attention_ref",
]
