"""Label agreement of a runner with the fp32 reference model: the share of output pixels whose label is the
reference's on the same inputs. A fast row is only worth its speed if it still computes the same model; int8 and
half-precision rows can drift from it, and this says by how much.

The reference is ``Segformer.from_config(variant, num_labels, seed=0)`` in IEEE fp32 (TF32 off), eager, on the fp32
inputs of the row's seed (``make_inputs(batch, resolution, device, torch.float32, seed)``); its labels are computed
once per (variant, resolution, batch, protocol) and cached. Labels are the argmax over the class dimension of the
logits at the logits' resolution; paper-protocol rows (``--paper``) return full-resolution labels, and the
reference goes through the same wrapper (``labels_on_host``). The table marks rows below ``AGREEMENT_FLOOR``
(bench_common.model).
"""

from __future__ import annotations

import torch

from segformer_fast.core.numerics import no_tf32
from segformer_fast.model.segformer import Segformer

from .harness import free_memory, one_line
from .model import Resolution, labels_on_host, make_inputs


def output_labels(output: torch.Tensor, *, paper: bool) -> torch.Tensor:
    """Labels (B, h, w) int64 on the CPU: the argmax over the class dimension of logits (B, K, h, w), or, for
    paper-protocol rows, the runner's full-resolution labels (B, H, W) as they are."""
    labels = output if paper else output.argmax(1)
    return labels.to(device="cpu", dtype=torch.int64)


def label_agreement(labels: torch.Tensor, reference_labels: torch.Tensor) -> float:
    """The share (0..1) of pixels where ``labels`` equals ``reference_labels`` (both (B, h, w))."""
    if labels.shape != reference_labels.shape:
        raise RuntimeError(f"labels of shape {tuple(labels.shape)}, the reference's {tuple(reference_labels.shape)}")
    return (labels == reference_labels).double().mean().item()


class ReferenceLabels:
    """The fp32 reference model's labels per (variant, resolution, batch, protocol), computed once and cached.

    ``compute`` runs before any runner of a setting is built, so the reference model is never alive beside a
    runner's model; a failure (out of memory on a small GPU, say) is kept as the reason, and ``get`` returns None.
    """

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.seed = seed
        self._labels: dict = {}  # key -> (B, h, w) int64 on the CPU
        self._failures: dict = {}  # key -> reason

    @staticmethod
    def _key(variant: str, resolution: Resolution, batch: int, paper: bool) -> tuple:
        return (variant, resolution.height, resolution.width, resolution.num_labels, batch, paper)

    def compute(self, variant: str, resolution: Resolution, batches: list, *, paper: bool) -> None:
        """Compute the labels of every batch size not cached yet, with one reference model."""
        missing = [b for b in batches if self._key(variant, resolution, b, paper) not in self._labels]
        if not missing:
            return
        model = None
        try:
            model = Segformer.from_config(variant, num_labels=resolution.num_labels, seed=0)
            model = model.to(device=self.device, dtype=torch.float32).eval()
            forward = labels_on_host(model, engine_labels=False) if paper else model
            for batch in missing:
                pixel_values = make_inputs(batch, resolution, self.device, torch.float32, self.seed)
                with torch.inference_mode(), no_tf32():
                    self._labels[self._key(variant, resolution, batch, paper)] = output_labels(
                        forward(pixel_values), paper=paper)
        except Exception as err:  # noqa: BLE001 - no reference means no agreement, never a failed benchmark
            for batch in missing:
                self._failures.setdefault(self._key(variant, resolution, batch, paper), one_line(err))
        finally:
            del model
            free_memory(self.device)

    def get(self, variant: str, resolution: Resolution, batch: int, *, paper: bool) -> torch.Tensor | None:
        """The cached labels (B, h, w), computing them first if needed; None where the reference failed."""
        key = self._key(variant, resolution, batch, paper)
        if key not in self._labels and key not in self._failures:
            self.compute(variant, resolution, [batch], paper=paper)
        return self._labels.get(key)

    def failure(self, variant: str, resolution: Resolution, batch: int, *, paper: bool) -> str | None:
        """Why the reference labels of this setting could not be computed (None if they were)."""
        return self._failures.get(self._key(variant, resolution, batch, paper))


__all__ = ["output_labels", "label_agreement", "ReferenceLabels"]
