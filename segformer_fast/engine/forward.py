"""SegFormer's forward pass on prepared weights, written once: the engine runs it on its backend's ops object,
export traces it on an export ops object (``segformer_fast.export.graph``).

An ops object provides one method per step (``engine.backends.TorchOps`` documents them): ``patch_embed_norm``,
``layer_norm``, ``attention``, ``mixffn``, ``project`` and ``decode``. Tokens are channels-last (B, h*w, C),
row-major over the stage grid.
"""

import torch.nn.functional as F

from segformer_fast.prepared.decoder_fold import FoldedDecodeHead
from segformer_fast.prepared.weights import StageParams


def prepared_forward(ops, stages: list, decoder: FoldedDecodeHead, pixel_values):
    """pixel_values (B, 3, H, W) -> logits (B, K, ceil(H/4), ceil(W/4)) in the weights' dtype.

    stages: four ``StageParams``; decoder: the folded decode head (its ``weights`` project each stage's output).
    """
    image = pixel_values
    projected = []
    for stage, fold_weight in zip(stages, decoder.weights):
        tokens, height, width = _patch_embed(ops, image, stage)
        batch, _, channels = tokens.shape
        for block in stage.blocks:
            tokens = ops.attention(ops.layer_norm(tokens, block.norm1), tokens, height, width, block.attn)
            tokens = ops.mixffn(ops.layer_norm(tokens, block.norm2), tokens, height, width, block.mlp)
        tokens = ops.layer_norm(tokens, stage.norm)
        # the folded head's projection of this stage, P_i = F_i W'_i^T, at the stage's own resolution, as
        # channels-last (B, h_i, w_i, D): computed now, while the tokens are in cache, so the stage output need not
        # be kept until the encoder is done (the CPU ops keep the narrower tokens instead and project in decode,
        # stage 1 inside the fused decode op, so its map is never written: engine.backends.TorchOps)
        projected.append(ops.project(tokens, fold_weight, batch, height, width))
        # channels-last (B, C, h, w) view of the stage output: the next patch-embed conv reads it without a copy
        image = tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)
    # folded All-MLP head: bilinear upsampling of the projections, sum, bias, ReLU, classifier
    return ops.decode(projected, decoder)


def _patch_embed(ops, image, stage: StageParams) -> tuple:
    """Overlapping patch embedding: strided conv, then LayerNorm of the tokens: (tokens (B, h*w, C), h, w).

    A function of its own so that the conv output is freed on return, not kept through the stage's blocks."""
    embedded = F.conv2d(image, stage.patch_weight, stage.patch_bias, stride=stage.stride, padding=stage.padding)
    return ops.patch_embed_norm(embedded, stage.patch_norm), embedded.shape[2], embedded.shape[3]
