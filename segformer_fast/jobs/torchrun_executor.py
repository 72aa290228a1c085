"""Segmentation and evaluation across processes started by torchrun (one per GPU, or several on a CPU with gloo).

``torchrun --nproc-per-node N -m segformer_fast segment ...``: rank 0 plans the job (images, manifest, resume) and
broadcasts it; rank r takes every N-th image from position r (no duplicates, none left out), on ``cuda:LOCAL_RANK``
(NCCL) or on the CPU (gloo). All ranks take the same number of steps of ``batch_size`` images (a rank whose shard
is shorter takes empty steps), and after each step the records are gathered so that rank 0 appends them to the
manifest and advances the progress bar: the manifest, the outputs and the resume rule are those of the Ray job.

``eval``: each rank scores its shard with a ``MetricAccumulator``; rank 0 sums the gathered integer counts, so the
metrics equal the single-process result exactly, and returns the report to print.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .evaluation import build_report
from .metrics import MetricAccumulator
from .model import Segformer
from .predictors import make_predictor
from .runtime import parse_dtype, resolve_device
from .scaleout import (
    COUNT_FIELDS,
    ImageSegmenter,
    SegmentSettings,
    SegmentSummary,
    add_counts,
    plan_segment,
    progress_bar,
    record_results,
    score_sample,
    torchrun_world,
    worker_name,
)


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
                     retry_failed: bool = False, progress: bool = True) -> SegmentSummary:
    """This rank's part of a torchrun segmentation (see the module docstring); the summary covers all ranks and
    has ``report`` set on rank 0 only."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rank, local_rank, world_size = torchrun_world()
    rank_device = _rank_device(device, local_rank)
    with _ProcessGroup(rank_device):
        plan, error = None, None
        if rank == 0:
            try:
                plan = plan_segment(inputs, out_dir, settings.overlay, retry_failed)
            except (FileNotFoundError, ValueError) as failure:
                error = str(failure)
        plan, error = _broadcast((plan, error), rank)
        _raise_if_any_failed([error], "planning the job")
        start = time.perf_counter()
        shard = plan.todo[rank::world_size]
        steps = math.ceil(math.ceil(len(plan.todo) / world_size) / batch_size)
        segmenter, error = None, None
        if steps:
            try:
                segmenter = ImageSegmenter(settings, rank_device, f"rank {rank} {worker_name()}")
            except Exception as failure:  # every rank must learn of it before the first gather
                error = f"{type(failure).__name__}: {failure}"
            _raise_if_any_failed(_gather(error, world_size), "building the engine")

        def records():
            for step in range(steps):
                batch = shard[step * batch_size:(step + 1) * batch_size]
                mine = segmenter.segment_files(batch) if batch else []
                for gathered in _gather(mine, world_size):
                    yield from gathered

        if rank == 0:
            summary = record_results(plan, records(), progress, world_size, start)
        else:
            everything = list(records())
            failed = [record for record in everything if record["status"] != "ok"]
            summary = SegmentSummary(plan.out_dir, len(plan.images), plan.done_before, len(everything) - len(failed),
                                     failed, plan.failed_before, time.perf_counter() - start, world_size,
                                     report=False)
    return summary


def evaluate_torchrun(dataset, settings: SegmentSettings, *, device: str = "auto", progress: bool = True) -> tuple:
    """This rank's part of a torchrun evaluation: (report, description) on rank 0, (None, description) elsewhere.
    Rank r scores samples r, r + N, ...; rank 0 sums every rank's counts."""
    rank, local_rank, world_size = torchrun_world()
    rank_device = _rank_device(device, local_rank)
    where = f"torchrun, {world_size} processes ({'NCCL' if rank_device.type == 'cuda' else 'gloo'})"
    with _ProcessGroup(rank_device):
        accumulator = MetricAccumulator(dataset.num_classes)
        shard = dataset.samples[rank::world_size]
        error = None
        try:
            model = Segformer.from_pretrained(settings.model).to(device=rank_device).eval()
            options = {"crop": settings.crop, "stride": settings.stride} if settings.mode == "slide" else {}
            predict = make_predictor(model, settings.engine, settings.mode, resize=settings.resize(),
                                     device=rank_device, dtype=parse_dtype(settings.dtype), **options)
            bar = progress_bar(len(shard), progress and rank == 0, f"eval (rank 0 of {world_size})")
            for sample in shard:
                add_counts(accumulator, score_sample(predict, dataset, sample))
                bar.update(1)
            bar.close()
        except Exception as failure:  # every rank must learn of it, or the others wait in the gather forever
            error = f"{type(failure).__name__}: {failure}"
        counts = {field: getattr(accumulator, field) for field in COUNT_FIELDS}
        gathered = _gather((counts, error), world_size)
    _raise_if_any_failed([error for _, error in gathered], "evaluation")
    if rank != 0:
        return None, where
    total = MetricAccumulator(dataset.num_classes)
    for counts, _ in gathered:
        add_counts(total, counts)
    return build_report(total.compute(), dataset), where
