"""The jobs: ``segment`` (label maps and overlays for image files) and ``eval`` (mIoU on a dataset), each as plan,
work, record and summarize (``segment``, ``evaluate``), run by three executors: in process (``local``,
``evaluate.evaluate``), Ray Data (``ray_executor``) and torchrun (``torchrun_executor``). Beside them: what they
write (``outputs``, ``manifest``, ``palettes``), score (``metrics``) and read (``datasets``), and the predictors
that run a checkpoint (``predictors``). The public scale-out API is re-exported here."""

from .ray_executor import evaluate_with_ray, segment_with_ray
from .settings import SegmentSettings

__all__ = ["SegmentSettings", "evaluate_with_ray", "segment_with_ray"]
