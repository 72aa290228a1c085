"""The batch jobs: ``segment`` (label maps and overlays for image files) and ``eval`` (mIoU on a dataset), each as
plan, work, record and summarize (``segment``, ``evaluate``), run by three executors that each plan first: in
process (``local``), Ray Data (``ray_executor``) and torchrun (``torchrun_executor``). Beside them: their settings
(``settings``), workers (``workers``) and progress (``progress``), what they write (``outputs``, ``manifest``), score
(``metrics``) and read (``datasets``), and a model run by an engine (``predictors``). The public scale-out API is
re-exported here.

Imports from the project: render, engine, inference, model, core.
"""

from segformer_fast.jobs.ray_executor import evaluate_with_ray, segment_with_ray
from segformer_fast.jobs.settings import SegmentSettings

__all__ = ["SegmentSettings", "evaluate_with_ray", "segment_with_ray"]
