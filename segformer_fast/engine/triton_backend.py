"""``TritonOps``: the engine's forward steps on the fused Triton kernels (``segformer_fast.kernels``).

Imported only when the engine runs the Triton kernels (triton is an optional dependency). The kernels are called
through their modules (``layernorm.layer_norm``, ...), so a test can spy on them by patching a module's attribute.
"""

import torch

from segformer_fast.engine.backends import TorchOps
from segformer_fast.kernels import layernorm, mixffn, sr_attention
from segformer_fast.prepared.decoder_fold import FoldedDecodeHead
from segformer_fast.prepared.weights import MixFFNParams, NormParams, SRAttentionParams


class TritonOps(TorchOps):
    """Triton LayerNorms, fused SR attention and Mix-FFN; the decoder as :class:`TorchOps` (projections + the
    extension's fused decode). Blocks whose stage grid is smaller than the SR ratio (images below ~29 px for the
    stage-1 ratio 8) have no reduced token for the SR kernel: their attention runs as :class:`TorchOps`' does
    (padded SR conv)."""

    name = "triton"

    def prepare(self, stages: list, decoder: FoldedDecodeHead) -> tuple:
        """The prepared weights as they are: the kernels read the plain (N, K) layout."""
        return stages, decoder

    def patch_embed_norm(self, features, norm: NormParams):
        batch, channels, height, width = features.shape
        if features.is_contiguous(memory_format=torch.channels_last):
            # stages 2-4 read the previous stage's tokens as a channels-last image, and the conv keeps that
            # layout: its output already is (B, h*w, C) tokens, so normalize that view (no transpose, no copy)
            tokens = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            return layernorm.layer_norm(tokens, norm.weight, norm.bias, norm.eps)
        return layernorm.patch_embed_layer_norm(features.contiguous(), norm.weight, norm.bias, norm.eps)

    def layer_norm(self, tokens, norm: NormParams):
        return layernorm.layer_norm(tokens, norm.weight, norm.bias, norm.eps)

    def attention(self, x_norm, residual, height, width, params: SRAttentionParams):
        if height < params.sr_ratio or width < params.sr_ratio:
            return super().attention(x_norm, residual, height, width, params)
        return sr_attention.sr_attention(x_norm, residual, height, width, params)

    def mixffn(self, x_norm, residual, height, width, params: MixFFNParams):
        return mixffn.mixffn(x_norm, height, width, params, residual=residual)
