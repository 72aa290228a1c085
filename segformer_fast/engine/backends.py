"""The engine's ops objects: one per backend, each method one step of SegFormer's forward pass
(``engine.forward.prepared_forward``).

Every backend takes the same prepared weights (``segformer_fast.prepared.weights``) and the same token layout:
channels-last tokens (B, H*W, C), row-major over the stage grid.

- :class:`TorchOps` (the CPU default): the CPU fast ops (:mod:`segformer_fast.ops.cpu`: oneDNN GEMMs on packed
  weights with fused residual adds, the fused depthwise conv + GELU) and the extension's ops (``layer_norm``,
  ``kv_attention``, ``fused_decode``: :mod:`segformer_fast.ops.extension`).
- :class:`EagerOps`: the reference ops (:mod:`segformer_fast.ops.reference`) everywhere, the decoder included (a
  debugging aid, and what the fast backends are checked against).
- ``TritonOps`` (``segformer_fast.engine.triton_backend``, the CUDA default): the fused Triton kernels.
"""

import dataclasses
from typing import NamedTuple

import torch

from segformer_fast.ops import cpu, extension, reference
from segformer_fast.prepared.decoder_fold import FoldedDecodeHead
from segformer_fast.prepared.weights import BlockParams, MixFFNParams, NormParams, SRAttentionParams

#: The GEMM weights of each params dataclass, the ones ``TorchOps.prepare`` packs for oneDNN.
_GEMM_WEIGHTS = {
    SRAttentionParams: ("q_weight", "kv_weight", "o_weight", "sr_weight"),
    MixFFNParams: ("fc1_weight", "fc2_weight"),
}


def _pack_gemm_weights(params):
    """A copy of an SRAttentionParams / MixFFNParams with its GEMM weights packed (cpu.pack_linear_weight)."""
    return dataclasses.replace(params, **{
        name: cpu.pack_linear_weight(getattr(params, name)) for name in _GEMM_WEIGHTS[type(params)]
    })


def _patch_weight_for(stage_index: int, weight):
    """Stage 1's patch-embed conv weight as it is (its input is the NCHW image), the later stages' channels-last."""
    return weight if stage_index == 0 else weight.contiguous(memory_format=torch.channels_last)


class StageTokens(NamedTuple):
    """A stage's output tokens (B, h*w, C_i) and its folded decoder weight (D, C_i), kept for ``TorchOps.decode``."""

    tokens: torch.Tensor
    weight: torch.Tensor
    batch: int
    height: int
    width: int


class TorchOps:
    """The prepared forward's steps on the CPU fast ops, with the extension's attention core and fused decode."""

    name = "torch"

    def prepare(self, stages: list, decoder: FoldedDecodeHead) -> tuple:
        """The (stages, decoder) this backend runs on, made once from the prepared weights: on CPU every GEMM
        weight packed for oneDNN (``cpu.pack_linear_weight``; weights it cannot pack stay as they are), but the
        stage-1 decoder projection, which ``extension.fused_decode_tokens`` takes plain; the patch-embed conv
        weights of stages 2-4 channels-last, the layout of their inputs (the previous stage's tokens), which
        oneDNN would otherwise convert them to on every call. The prepared weights themselves are left unchanged
        (export and the Triton path read them)."""
        packed_stages = [
            dataclasses.replace(stage, patch_weight=_patch_weight_for(index, stage.patch_weight), blocks=[
                BlockParams(block.norm1, _pack_gemm_weights(block.attn), block.norm2, _pack_gemm_weights(block.mlp))
                for block in stage.blocks
            ])
            for index, stage in enumerate(stages)
        ]
        packed_decoder = dataclasses.replace(
            decoder, weights=(decoder.weights[0], *(cpu.pack_linear_weight(weight) for weight in decoder.weights[1:])))
        return packed_stages, packed_decoder

    def patch_embed_norm(self, features, norm: NormParams):
        """The patch-embed conv output (B, C, h, w), any layout -> LayerNorm-ed tokens (B, h*w, C): the extension's
        LayerNorm reads the first stage's NCHW output as it is (channel-major tokens), the later stages'
        channels-last outputs as rows."""
        return extension.layer_norm(features.flatten(2).transpose(1, 2), norm.weight, norm.bias, norm.eps)

    def layer_norm(self, tokens, norm: NormParams):
        """LayerNorm over the channels of tokens (B, N, C)."""
        return extension.layer_norm(tokens, norm.weight, norm.bias, norm.eps)

    def attention(self, x_norm, residual, height, width, params: SRAttentionParams):
        """residual + SR attention of the normalized tokens x_norm (B, h*w, C) on an h x w grid: q, for R > 1 the
        SR conv as a patchify GEMM and the SR LayerNorm, the merged k/v projection, the attention core
        (:meth:`_attention_core`), the output projection with the residual add in its epilogue."""
        q = cpu.linear(x_norm, params.q_weight, params.q_bias)
        kv_tokens = x_norm
        if params.sr_ratio > 1:
            reduced = cpu.linear(cpu.sr_patches(x_norm, height, width, params.sr_ratio), params.sr_weight,
                                 params.sr_bias)
            kv_tokens = extension.layer_norm(reduced, params.sr_ln_weight, params.sr_ln_bias, params.sr_eps)
        kv = cpu.linear(kv_tokens, params.kv_weight, params.kv_bias)
        return cpu.linear(self._attention_core(q, kv, params.num_heads), params.o_weight, params.o_bias, residual)

    @staticmethod
    def _attention_core(q, kv, heads):
        """softmax(q kᵀ) v per head on the core this CPU runs faster (``cpu.sdpa_attention_is_faster``): PyTorch's
        fused attention (bf16 on CPUs with AMX), or the extension's ``kv_attention``; the latter on other devices and
        while tracing."""
        if q.device.type == "cpu" and not cpu.tracing() and cpu.sdpa_attention_is_faster(q.dtype):
            return cpu.sdpa_attention(q, kv, heads)
        return extension.kv_attention(q, kv, heads)

    def mixffn(self, x_norm, residual, height, width, params: MixFFNParams):
        """residual + Mix-FFN of the normalized tokens x_norm (B, h*w, C) on an h x w grid (fc2 with the residual
        add in its epilogue)."""
        return cpu.mixffn(x_norm, height, width, params, residual=residual)

    def project(self, tokens, weight, batch, height, width):
        """One stage's folded decoder projection, deferred to :meth:`decode`: the tokens (B, h*w, C_i) and weight kept
        as :class:`StageTokens`. The tokens are narrower than their projection (C_i <= D), so keeping them costs
        less memory than keeping the (B, h, w, D) map, and stage 1's map is never written at all."""
        return StageTokens(tokens, weight, batch, height, width)

    def decode(self, projected, decoder: FoldedDecodeHead):
        """The folded decode head: the four stages' :class:`StageTokens` -> logits (B, K, h_1, w_1). Stages 2-4 are
        projected to channels-last (B, h_i, w_i, D) maps by one GEMM each; the extension's fused op projects stage 1
        per block of rows itself, then upsamples to the stage-1 grid, sums, adds the folded bias, applies ReLU and
        the classifier (``extension.fused_decode_tokens``)."""
        first, *later = projected
        maps = [cpu.project_stage(*stage) for stage in later]
        tokens = first.tokens.reshape(first.batch, first.height, first.width, first.tokens.shape[-1])
        return extension.fused_decode_tokens(tokens.contiguous(), first.weight, *maps, decoder.bias,
                                             decoder.cls_weight, decoder.cls_bias)


class EagerOps:
    """The reference ops throughout (:mod:`segformer_fast.ops.reference`), the decoder's tail too."""

    name = "eager"

    def prepare(self, stages: list, decoder: FoldedDecodeHead) -> tuple:
        """The prepared weights as they are (plain PyTorch GEMMs)."""
        return stages, decoder

    def patch_embed_norm(self, features, norm: NormParams):
        return reference.patch_embed_layer_norm(features, norm.weight, norm.bias, norm.eps)

    def layer_norm(self, tokens, norm: NormParams):
        return reference.layer_norm(tokens, norm.weight, norm.bias, norm.eps)

    def attention(self, x_norm, residual, height, width, params: SRAttentionParams):
        return reference.sr_attention(x_norm, residual, height, width, params)

    def mixffn(self, x_norm, residual, height, width, params: MixFFNParams):
        return reference.mixffn(x_norm, height, width, params, residual=residual)

    def project(self, tokens, weight, batch, height, width):
        return reference.project_stage(tokens, weight, batch, height, width)

    def decode(self, projected, decoder: FoldedDecodeHead):
        return reference.fused_decode(*projected, decoder.bias, decoder.cls_weight, decoder.cls_bias)
