"""The folded decode head (``prepared.decoder_fold``) run on stage features, for ``bench_decoder.py`` and the fold's
tests: the fast path and its reference.

features: four (B, C_i, h_i, w_i) stage maps (channels-last memory or not) -> logits (B, K, h_1, w_1). Each stage is
projected at its own resolution (P_i = F_i W'_iᵀ, channels-last (B, h_i, w_i, D)), then upsampled, summed, biased,
ReLU-ed and classified.
"""

import torch

from segformer_fast.ops import cpu, extension, reference
from segformer_fast.prepared.decoder_fold import FoldedDecodeHead


def project_features(features, folded: FoldedDecodeHead, project_stage=cpu.project_stage) -> list:
    """P_i = F_i W'_iᵀ of each stage: four contiguous channels-last (B, h_i, w_i, D) maps, the layout
    :func:`segformer_fast.ops.extension.fused_decode` takes. ``project_stage``: the fast projection (default) or
    :func:`segformer_fast.ops.reference.project_stage`."""
    projected = []
    for feature, weight in zip(features, folded.weights):
        batch, channels, height, width = feature.shape
        if weight.shape[1] != channels:
            raise ValueError(f"stage feature has {channels} channels but the folded weight expects {weight.shape[1]}")
        # (B*h*w, C) rows: 2-D, since 3-D matmul / linear on a batch-1 view took a slower batched path
        rows = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        projected.append(project_stage(rows, weight, batch, height, width))
    return projected


def folded_decode_ref(features, folded: FoldedDecodeHead) -> torch.Tensor:
    """The reference composition: :func:`segformer_fast.ops.reference.project_stage` per stage, then
    :func:`segformer_fast.ops.reference.fused_decode` (fp32, or fp64 for fp64 inputs)."""
    projected = project_features(features, folded, reference.project_stage)
    return reference.fused_decode(*projected, folded.bias, folded.cls_weight, folded.cls_bias)


@torch.no_grad()
def folded_decode(features, folded: FoldedDecodeHead) -> torch.Tensor:
    """The fast path: :func:`project_features`, then the extension's fused upsample-sum-ReLU-classifier op (its
    eager fallback where the extension is not built)."""
    projected = project_features(features, folded)
    return extension.fused_decode(*projected, folded.bias, folded.cls_weight, folded.cls_bias)
