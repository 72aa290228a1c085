"""Fused Triton kernels for the SegFormer encoder, installed as ``segformer_fast.kernels``.

One file per fused op, each with its ``*_ref`` beside it (``segformer_fast.ops.reference``'s op run in fp32, fp64
for fp64 inputs, or in the input's dtype for the eager error of the tolerance rule):

- ``layernorm``: ``layer_norm`` (optionally fused with the residual add), ``patch_embed_layer_norm``.
- ``sr_kv``: the keys and values (patchify + SR LayerNorm + k/v; split over K where the grid is short);
- ``sr_attention``: ``sr_attention`` = ``sr_kv`` (patchify + SR LayerNorm + k/v) + ``flash_sr_attention``
  (q projection, online softmax, output projection + residual), on weights from ``prepare_sr_attention_params``.
- ``mixffn``: ``mixffn`` = fc1 (``linear``) + ``mixffn_fc2`` (dwconv + GELU in fc2's operand load).
- ``linear``: ``linear`` (GEMM + bias + optional residual).
- ``common``: the helpers they share (input checks, the interpreter's bf16 dot workaround, the reference dtype).

The kernels import from the package only the rooms below them: ``segformer_fast.prepared.weights`` (weight
dataclasses), ``segformer_fast.ops.reference`` (the references) and ``segformer_fast.core.runtime`` (compute dtypes);
the prepared-weight classes and functions are re-exported here for convenience.

Set ``TRITON_INTERPRET=1`` before importing triton to run the kernels on CPU tensors (slow; for tests).
"""

from segformer_fast.prepared.weights import (
    MixFFNParams,
    SRAttentionParams,
    prepare_mixffn_params,
    prepare_sr_attention_params,
)

from .layernorm import layer_norm, layer_norm_ref, patch_embed_layer_norm, patch_embed_layer_norm_ref
from .linear import linear, linear_ref
from .mixffn import dwconv_gelu_ref, mixffn, mixffn_fc2, mixffn_ref
from .sr_attention import (
    flash_sr_attention,
    reduced_size,
    sr_attention,
    sr_attention_ref,
    sr_kv,
    sr_kv_ref,
)

__all__ = [
    "layer_norm", "layer_norm_ref", "patch_embed_layer_norm", "patch_embed_layer_norm_ref",
    "linear", "linear_ref",
    "MixFFNParams", "prepare_mixffn_params", "dwconv_gelu_ref", "mixffn", "mixffn_fc2", "mixffn_ref",
    "SRAttentionParams", "prepare_sr_attention_params", "reduced_size", "sr_kv", "sr_kv_ref", "flash_sr_attention",
    "sr_attention", "sr_attention_ref",
]
