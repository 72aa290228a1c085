"""The in-process executor: the segment job run by one :class:`~segformer_fast.jobs.segment.SegmentWorker` in this
process, one image at a time, with a progress bar of each image's sliding windows."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from .segment import SegmentPlan, SegmentSummary, SegmentWorker, record_results
from .settings import SegmentSettings, worker_name


class _WindowProgress:
    """``progress(done, total)`` for one image's sliding windows: a second progress bar, opened at the first report
    (a whole-image run reports nothing and shows none), redrawn at every report (a window takes long enough)."""

    def __init__(self, name: str):
        self.name = name
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            # steps: the sliding windows' forwards and the streamed label bands between them
            self.bar = tqdm(total=total, desc=self.name, unit="step", leave=False, position=1, mininterval=0)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def segment_in_process(plan: SegmentPlan, settings: SegmentSettings, *, device="cpu",
                       progress: bool = True) -> SegmentSummary:
    """Run ``plan`` in this process (the engine is built only when something is left to do)."""
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
