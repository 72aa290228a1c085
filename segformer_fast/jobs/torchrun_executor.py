"""The torchrun executor: the segment and eval jobs across processes started by torchrun (one per GPU, or several
on a CPU with gloo).

``torchrun --nproc-per-node N -m segformer_fast segment ...``: rank 0 plans the job (images, manifest, resume; see
``segment``) and broadcasts it; rank r takes every N-th image from position r (no duplicates, none left out), on
``cuda:LOCAL_RANK`` (NCCL) or on the CPU (gloo). All ranks take the same number of steps of ``batch_size`` images
(a rank whose shard is shorter takes empty steps), and after each step the records are gathered so that rank 0
appends them to the manifest and advances the progress bar: the manifest, the outputs, the resume rule and the
words are those of every executor.

``eval``: each rank scores its shard with a ``MetricAccumulator``; rank 0 sums the gathered integer counts, so the
metrics equal the single-process result exactly, and returns the report to print.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from segformer_fast.core.runtime import resolve_device
from segformer_fast.jobs.evaluate import EvalWorker, build_report, plan_evaluate
from segformer_fast.jobs.metrics import MetricAccumulator
from segformer_fast.jobs.progress import Interrupted, progress_bar
from segformer_fast.jobs.segment import SegmentSummary, SegmentWorker, plan_segment, record_results
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.jobs.workers import check_pool, torchrun_world, worker_name


def _rank_device(device: str, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for "auto" with CUDA available or for "cuda"; otherwise the device as named."""
    chosen = resolve_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    return chosen


class _ProcessGroup:
    """Joins torchrun's process group (NCCL for CUDA devices, else gloo) and leaves it at the end."""

    def __init__(self, device: torch.device):
        self.backend = "nccl" if device.type == "cuda" else "gloo"

    def __enter__(self):
        if not dist.is_initialized():
            dist.init_process_group(backend=self.backend)
        return self

    def __exit__(self, *exc_info):
        dist.destroy_process_group()


def _broadcast(value, rank: int):
    """``value`` from rank 0 on every rank."""
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value, world_size: int) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _raise_if_any_failed(errors: list, what: str) -> None:
    """Every rank raises the first rank's error, so none waits forever in the next collective."""
    for rank, error in enumerate(errors):
        if error is not None:
            raise ValueError(f"{what} failed on rank {rank}: {error}")


def segment_torchrun(inputs, out_dir, settings: SegmentSettings, *, device: str = "auto", batch_size: int = 4,
                     retry_failed: bool = False, skip_existing: bool = False, progress: bool = True,
                     on_plan=None) -> SegmentSummary:
    """This rank's part of a torchrun segmentation (see the module docstring); the summary covers all ranks and
    has ``report`` set on rank 0 only, where ``on_plan(plan)`` is called before the work."""
    check_pool(batch_size=batch_size)
    rank, local_rank, world_size = torchrun_world()
    rank_device = _rank_device(device, local_rank)
    with _ProcessGroup(rank_device):
        plan, error = None, None
        if rank == 0:
            try:
                plan = plan_segment(inputs, out_dir, settings, retry_failed=retry_failed, skip_existing=skip_existing)
            except (FileNotFoundError, ValueError) as failure:
                error = str(failure)
            if plan is not None and on_plan is not None:
                on_plan(plan)
        plan, error = _broadcast((plan, error), rank)
        _raise_if_any_failed([error], "planning the job")
        start = time.perf_counter()
        shard = plan.todo[rank::world_size]
        steps = math.ceil(math.ceil(len(plan.todo) / world_size) / batch_size)
        worker, error = None, None
        if steps:
            try:
                worker = SegmentWorker(settings, rank_device, f"rank {rank} {worker_name()}")
            except Exception as failure:  # every rank must learn of it before the first gather
                error = f"{type(failure).__name__}: {failure}"
            _raise_if_any_failed(_gather(error, world_size), "building the engine")

        def records():
            for step in range(steps):
                batch = shard[step * batch_size:(step + 1) * batch_size]
                mine = worker.segment_files(batch) if batch else []
                for gathered in _gather(mine, world_size):
                    yield from gathered

        if rank == 0:
            summary = record_results(plan, records(), progress=progress, workers=world_size, start=start)
        else:
            everything = list(records())
            failed = [record for record in everything if record["status"] != "ok"]
            summary = SegmentSummary(plan, len(everything) - len(failed), failed, time.perf_counter() - start,
                                     world_size, report=False)
    return summary


def evaluate_torchrun(dataset, settings: SegmentSettings, *, device: str = "auto", progress: bool = True) -> tuple:
    """This rank's part of a torchrun evaluation: (report, description) on rank 0, (None, description) elsewhere.
    Rank r scores samples r, r + N, ...; rank 0 merges every rank's counts."""
    plan_evaluate(dataset, settings)
    rank, local_rank, world_size = torchrun_world()
    rank_device = _rank_device(device, local_rank)
    where = f"torchrun, {world_size} processes ({'NCCL' if rank_device.type == 'cuda' else 'gloo'})"
    with _ProcessGroup(rank_device):
        shard = dataset.samples[rank::world_size]
        counts, error = MetricAccumulator(dataset.num_classes).counts(), None
        bar = progress_bar(len(shard), progress and rank == 0, f"eval (rank 0 of {world_size})")
        try:
            counts = EvalWorker(settings, dataset, rank_device).score(shard, lambda: bar.update(1)).counts()
        except KeyboardInterrupt:
            raise Interrupted(bar.n, len(shard), resumable=False) from None
        except Exception as failure:  # every rank must learn of it, or the others wait in the gather forever
            error = f"{type(failure).__name__}: {failure}"
        finally:
            bar.close()
        gathered = _gather((counts, error), world_size)
    _raise_if_any_failed([error for _, error in gathered], "evaluation")
    if rank != 0:
        return None, where
    total = MetricAccumulator(dataset.num_classes)
    for counts, _ in gathered:
        total.merge(counts)
    return build_report(total.compute(), dataset), where
