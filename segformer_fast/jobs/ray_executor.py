"""Segmentation and evaluation of image collections on a Ray cluster with Ray Data.

The inputs become a Ray Dataset of paths, mapped with ``map_batches`` by a pool of actors
(:class:`RaySegmentPredictor`, :class:`RayEvalPredictor`), each building its engine once. Decoding happens in the
actors, so every path only has to be readable there (a shared or object-store file system mounted at the same
path). Ray Data restarts an actor whose process dies and retries the batches it held (its actor pools set
``max_restarts`` and ``max_task_retries`` to -1, without limit); outputs are renamed into place only once complete,
so a retried batch rewrites whole files and none is ever half-written. The driver
streams the records back, appends them to the manifest and advances the progress bar (see ``scaleout``).

ray is an optional extra (``pip install segformer-fast[scaleout]``), imported when a job starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path

import numpy as np

from .datasets import Sample
from .evaluation import build_report
from .metrics import MetricAccumulator
from .model import Segformer
from .predictors import make_predictor
from .runtime import parse_dtype
from .scaleout import (
    COUNT_FIELDS,
    ImageSegmenter,
    SegmentSettings,
    SegmentSummary,
    add_counts,
    import_ray,
    plan_segment,
    progress_bar,
    record_results,
    score_sample,
    set_threads,
    worker_name,
)


def _device_for_worker(use_gpu: bool) -> str:
    return "cuda" if use_gpu else "cpu"


class RaySegmentPredictor:
    """The ``map_batches`` callable class: one engine per actor; a batch of paths in, manifest records out.

    batch: {"input", "labels", "overlay"} arrays of strings. Returns the records as columns.
    """

    def __init__(self, settings: SegmentSettings, use_gpu: bool, cpus: float):
        set_threads(cpus)
        self.segmenter = ImageSegmenter(settings, _device_for_worker(use_gpu), worker_name())

    def __call__(self, batch: dict) -> dict:
        items = list(zip(batch["input"].tolist(), batch["labels"].tolist(), batch["overlay"].tolist()))
        records = self.segmenter.segment_files(items)
        columns = {key: [record[key] for record in records] for key in ("input", "output", "status", "worker")}
        columns["error"] = [record["error"] or "" for record in records]
        columns["seconds"] = [record["seconds"] for record in records]
        return {key: np.asarray(values) for key, values in columns.items()}


class RayEvalPredictor:
    """The ``map_batches`` callable class for evaluation: one predictor per actor; a batch of (image, annotation)
    paths in, one row of summed ``MetricAccumulator`` counts out.

    dataset: the ``SegmentationDataset`` (without its samples) whose label loading applies (reduce_zero_label,
    Cityscapes trainIds)."""

    def __init__(self, settings: SegmentSettings, dataset, use_gpu: bool, cpus: float):
        set_threads(cpus)
        device = _device_for_worker(use_gpu)
        model = Segformer.from_pretrained(settings.model).to(device=device).eval()
        self.dataset = dataset
        self.num_classes = model.config.num_labels
        options = {"crop": settings.crop, "stride": settings.stride} if settings.mode == "slide" else {}
        self.predict = make_predictor(model, settings.engine, settings.mode, resize=settings.resize(), device=device,
                                      dtype=parse_dtype(settings.dtype), **options)

    def __call__(self, batch: dict) -> dict:
        accumulator = MetricAccumulator(self.num_classes)
        for image_path, label_path in zip(batch["image"].tolist(), batch["label"].tolist()):
            counts = score_sample(self.predict, self.dataset, Sample(Path(image_path), Path(label_path)))
            add_counts(accumulator, counts)
        return {field: np.asarray([getattr(accumulator, field)]) for field in COUNT_FIELDS}


def pool_arguments(map_batches, workers: int) -> dict:
    """The ``map_batches`` keyword for a fixed pool of ``workers`` actors: ``compute=ActorPoolStrategy(size=...)``
    where the installed Ray takes it (Ray 2.51 deprecates ``concurrency=`` in its favor), else ``concurrency=``
    where ``map_batches`` takes it, else the oldest form ``ActorPoolStrategy(min_size=..., max_size=...)``."""
    from ray.data import ActorPoolStrategy

    if "size" in inspect.signature(ActorPoolStrategy).parameters:
        return {"compute": ActorPoolStrategy(size=workers)}
    if "concurrency" in inspect.signature(map_batches).parameters:
        return {"concurrency": workers}
    return {"compute": ActorPoolStrategy(min_size=workers, max_size=workers)}


class _RaySession:
    """Connects to the cluster at ``address`` ("auto", "host:port", "ray://host:port") or starts a local one
    (address None or ""); leaves an already initialized Ray as it is, and shuts down only what it started."""

    def __init__(self, address: str | None):
        self.ray = import_ray()
        self.address = address or None
        self.started = False

    def __enter__(self):
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=self.address, logging_level="WARNING", log_to_driver=True)
            except ConnectionError as error:
                raise ValueError(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
            self.started = True
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images from the records instead
        return self.ray

    def __exit__(self, *exc_info):
        if self.started:
            self.ray.shutdown()


def _check_pool(workers: int, batch_size: int, gpus_per_worker, cpus_per_worker: float) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if gpus_per_worker is not None and not (isinstance(gpus_per_worker, (int, float)) and gpus_per_worker >= 0):
        raise ValueError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")
    if not (isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0):
        raise ValueError(f"cpus_per_worker must be a number > 0, got {cpus_per_worker!r}")


def _gpus(ray, gpus_per_worker) -> float:
    """GPUs per actor: as given, else 1 where the cluster has GPUs and 0 where it has none."""
    if gpus_per_worker is not None:
        return float(gpus_per_worker)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _map(ray, rows: list, predictor_class, constructor_kwargs: dict, *, workers, batch_size, gpus, cpus):
    dataset = ray.data.from_items(rows)
    return dataset.map_batches(predictor_class, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                               batch_format="numpy", num_cpus=cpus, num_gpus=gpus,
                               **pool_arguments(dataset.map_batches, workers))


def segment_with_ray(
    inputs,
    out_dir,
    settings: SegmentSettings,
    *,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1,
    batch_size: int = 4,
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    predictor_class=RaySegmentPredictor,
) -> SegmentSummary:
    """Segment image files (a path, a folder searched recursively, or a list of them) with a pool of ``workers``
    Ray actors, writing ``<name>_labels.png`` (and ``_overlay.png`` with ``settings.overlay``) under ``out_dir`` as
    ``segformer-fast segment`` names them, and the manifest beside them; finished images of earlier runs are skipped.

    Each actor holds one engine, ``gpus_per_worker`` GPUs (default: 1 where the cluster has GPUs, else 0) and
    ``cpus_per_worker`` CPUs (its torch threads); ``batch_size`` images go to an actor at a time. ``address``: a
    running cluster ("auto", "host:6379", "ray://host:10001"), or None for a local one (Ray's ``RAY_ADDRESS``
    applies). ImportError naming the extra when ray is not installed.
    """
    _check_pool(workers, batch_size, gpus_per_worker, cpus_per_worker)
    import_ray()
    plan = plan_segment(inputs, out_dir, settings.overlay, retry_failed)
    start = time.perf_counter()
    if not plan.todo:
        return record_results(plan, [], progress, workers, start)
    with _RaySession(address) as ray:
        gpus = _gpus(ray, gpus_per_worker)
        rows = [{"input": source, "labels": labels, "overlay": overlay} for source, labels, overlay in plan.todo]
        results = _map(ray, rows, predictor_class, {"settings": settings, "use_gpu": gpus > 0,
                                                    "cpus": cpus_per_worker},
                       workers=workers, batch_size=batch_size, gpus=gpus, cpus=cpus_per_worker)
        records = ({"input": row["input"], "output": row["output"], "status": row["status"],
                    "error": row["error"] or None, "worker": row["worker"], "seconds": float(row["seconds"])}
                   for row in results.iter_rows())
        return record_results(plan, records, progress, workers, start)


def evaluate_with_ray(
    dataset,
    settings: SegmentSettings,
    *,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1,
    batch_size: int = 4,
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """``evaluation.evaluate`` on a Ray actor pool: each batch's counts are computed in a worker and summed here.
    Returns the same report (``build_report``) as a single process, with exactly the same numbers."""
    _check_pool(workers, batch_size, gpus_per_worker, cpus_per_worker)
    if len(dataset) == 0:
        raise ValueError(f"no images to evaluate in {dataset.root}")
    import_ray()
    total = MetricAccumulator(dataset.num_classes)
    with _RaySession(address) as ray:
        gpus = _gpus(ray, gpus_per_worker)
        rows = [{"image": str(sample.image), "label": str(sample.label)} for sample in dataset.samples]
        loader = dataclasses.replace(dataset, samples=[])
        results = _map(ray, rows, RayEvalPredictor, {"settings": settings, "dataset": loader, "use_gpu": gpus > 0,
                                                     "cpus": cpus_per_worker},
                       workers=workers, batch_size=batch_size, gpus=gpus, cpus=cpus_per_worker)
        bar = progress_bar(len(dataset), progress, "eval")
        try:
            for row in results.iter_rows():
                add_counts(total, row)
                bar.update(int(row["num_images"]))
        finally:
            bar.close()
    return build_report(total.compute(), dataset)


