"""The in-process executor: the segment job run by one :class:`~segformer_fast.jobs.segment.SegmentWorker` in this
process, one image at a time, with a progress bar of each image's sliding windows; the eval job by one
:class:`~segformer_fast.jobs.evaluate.EvalWorker`, with a second model beside it when comparing. Each plans first,
as the Ray and torchrun executors do."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from segformer_fast.jobs.evaluate import EvalWorker, evaluate, plan_evaluate
from segformer_fast.jobs.segment import SegmentSummary, SegmentWorker, plan_segment, record_results
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.jobs.workers import worker_name


class _WindowProgress:
    """``progress(done, total)`` for one image's sliding windows: a second progress bar of the windows, opened at the
    first report ((0, total), before the first window runs, so its rate counts whole windows; a whole-image run
    reports nothing and shows none), redrawn at every report (a window takes long enough)."""

    def __init__(self, name: str):
        self.name = name
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.name, unit="window", leave=False, position=1, mininterval=0)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def segment_in_process(inputs, out_dir, settings: SegmentSettings, *, device="cpu", retry_failed: bool = False,
                       skip_existing: bool = False, progress: bool = True, on_plan=None) -> SegmentSummary:
    """Segment image files (a path, a folder searched recursively, or a list of them) in this process, as
    ``segment_with_ray`` does on Ray: plan (``segment.plan_segment``; ``on_plan(plan)`` is called before the work),
    then the work, on ``device`` (the engine is built only when something is left to do)."""
    plan = plan_segment(inputs, out_dir, settings, retry_failed=retry_failed, skip_existing=skip_existing)
    if on_plan is not None:
        on_plan(plan)
    start = time.perf_counter()

    def records():
        if not plan.todo:
            return
        worker = SegmentWorker(settings, device, worker_name())
        for item in plan.todo:
            windows = _WindowProgress(Path(item["input"]).name) if progress else None
            try:
                yield from worker.segment_files([item], progress=windows)
            finally:
                if windows is not None:
                    windows.close()

    return record_results(plan, records(), progress=progress, workers=1, start=start)


def evaluate_in_process(dataset, settings: SegmentSettings, *, device="cpu", compare: str | None = None,
                        progress: bool = True) -> dict:
    """The eval job in this process on ``device``: the report of ``evaluate.evaluate``, with a ``comparison``
    against ``compare`` ("reference" or "transformers": the same checkpoint, settings and device) when given."""
    plan_evaluate(dataset, settings)
    worker = EvalWorker(settings, dataset, device, compare=compare)
    result = evaluate(worker.predict, dataset, worker.num_classes, progress=progress, reference=worker.reference)
    if "comparison" in result:
        result["comparison"]["against"] = compare
    return result
