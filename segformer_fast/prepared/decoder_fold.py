"""The exact decoder fold (docs/DESIGN.md section 4, "Decoder fold").

Bilinear resize is linear per channel and preserves constants, and the All-MLP head is linear up to its ReLU, so
the per-stage Linear, the concat, ``linear_fuse`` and the eval-mode BatchNorm collapse into one (D x C_i) matrix
per stage plus one bias:

    s    = gamma / sqrt(running_var + eps)
    W'_i = diag(s) . W_f[:, block(i)] . W_i                      (D x C_i)
    b'   = diag(s) . sum_i W_f[:, block(i)] . b_i + (beta - s . running_mean)
    y    = ReLU( sum_i up_i( F_i W'_i^T ) + b' )                 (stage-1 grid; up_1 = identity)
    logits = y W_cls^T + b_cls

``block(i)`` is the input-channel block of ``linear_fuse`` that sees stage i: the concat order is [c4, c3, c2, c1],
so stage i (1-based) owns channels (4 - i) * D : (5 - i) * D. Each projection runs at its stage's own resolution
and the (B, 4D, H/4, W/4) concat never exists.
"""

from dataclasses import dataclass

import torch


@dataclass
class FoldedDecodeHead:
    """The folded decode head.

    weights: four (D, C_i) matrices W'_i, stage 1 first; bias: (D,) b'; cls_weight: (K, D); cls_bias: (K,).
    """

    weights: tuple
    bias: torch.Tensor
    cls_weight: torch.Tensor
    cls_bias: torch.Tensor

    @property
    def decoder_dim(self) -> int:
        return self.bias.shape[0]

    @property
    def num_labels(self) -> int:
        return self.cls_bias.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype

    def to(self, *args, **kwargs) -> "FoldedDecodeHead":
        """A copy moved/cast like ``Tensor.to`` (cast an fp64 fold down for the best accuracy)."""
        return FoldedDecodeHead(
            tuple(w.to(*args, **kwargs) for w in self.weights),
            self.bias.to(*args, **kwargs),
            self.cls_weight.to(*args, **kwargs),
            self.cls_bias.to(*args, **kwargs),
        )


@torch.no_grad()
def fold_decode_head(head, dtype: torch.dtype = torch.float32, device=None) -> FoldedDecodeHead:
    """Fold a reference ``DecodeHead`` (eval-mode BatchNorm) into a :class:`FoldedDecodeHead`.

    The arithmetic runs in fp64 on the CPU; the results are cast to ``dtype`` (and moved to ``device``, default the
    head's device) at the end.
    """
    if device is None:
        device = head.classifier.weight.device
    linears = list(head.linear_c)
    num_stages = len(linears)
    decoder_dim = head.bn.num_features
    fuse = head.linear_fuse.weight.detach().double().cpu()
    if fuse.shape[:2] != (decoder_dim, num_stages * decoder_dim) or fuse.shape[2:] != (1, 1):
        raise ValueError(
            f"linear_fuse weight must be ({decoder_dim}, {num_stages * decoder_dim}, 1, 1), got {tuple(fuse.shape)}"
        )
    fuse = fuse[:, :, 0, 0]
    bn = head.bn
    scale = bn.weight.detach().double().cpu() / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
    bias = bn.bias.detach().double().cpu() - scale * bn.running_mean.detach().double().cpu()
    weights = []
    for stage, linear in enumerate(linears):
        block = num_stages - 1 - stage
        fuse_block = fuse[:, block * decoder_dim : (block + 1) * decoder_dim]
        weights.append(scale[:, None] * (fuse_block @ linear.weight.detach().double().cpu()))
        bias = bias + scale * (fuse_block @ linear.bias.detach().double().cpu())
    classifier = head.classifier
    cls_weight = classifier.weight.detach().double().cpu().reshape(classifier.out_channels, decoder_dim)
    if classifier.bias is not None:
        cls_bias = classifier.bias.detach().double().cpu()
    else:
        cls_bias = torch.zeros(classifier.out_channels, dtype=torch.float64)
    return FoldedDecodeHead(tuple(weights), bias, cls_weight, cls_bias).to(device=device, dtype=dtype)
