"""The Ray Data executor: the segment and eval jobs on a Ray cluster.

The plan's items become a Ray Dataset, mapped with ``map_batches`` by a pool of actors (:class:`RaySegmentPredictor`,
:class:`RayEvalPredictor`), each building its worker once. Decoding happens in the actors, so every path only has
to be readable there (a shared or object-store file system mounted at the same path; a relative ``--model`` is made
absolute as the inputs are). Ray Data restarts an actor whose process dies and retries the batches it held;
outputs are renamed into place only once complete, so a retried batch rewrites whole files and none is ever
half-written. The driver streams the records back and records them as every executor does (``segment``).

Before any work the session refuses what would hang: an address where nothing answers (one line, within seconds),
and workers asking for more GPUs or CPUs than any node of the cluster has. An error inside the workers ends the job
with its first line, not Ray's tracebacks. ray is optional (``pip install "ray[data]"``, the
``scaleout`` extra), imported when a job starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import socket
import time
from pathlib import Path

import numpy as np

from segformer_fast.jobs.datasets import Sample
from segformer_fast.jobs.evaluate import EvalWorker, build_report, plan_evaluate, score_sample
from segformer_fast.jobs.metrics import MetricAccumulator
from segformer_fast.jobs.progress import Interrupted, progress_bar
from segformer_fast.jobs.segment import SegmentSummary, SegmentWorker, plan_segment, record_results
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.jobs.workers import check_pool, set_threads, worker_name
from segformer_fast.model.checkpoints import checkpoint_num_labels

INSTALL_HINT = 'pip install "ray[data]"'
#: Seconds to wait for a TCP connection to a cluster address before calling it unreachable.
CONNECT_TIMEOUT_S = 10


def import_ray():
    """The ``ray`` module with Ray Data; ImportError naming the extra to install when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate part of the ray package)
    except ImportError as error:
        raise ImportError(f"scaling out with Ray needs ray with Ray Data: {INSTALL_HINT}; import failed: {error}") \
            from None
    return ray


def _device_for_worker(use_gpu: bool) -> str:
    return "cuda" if use_gpu else "cpu"


class RaySegmentPredictor:
    """The ``map_batches`` callable class: one ``SegmentWorker`` per actor; a batch of items in, records out (as
    columns; ``notes`` joined by newlines)."""

    def __init__(self, settings: SegmentSettings, use_gpu: bool, cpus: float):
        set_threads(cpus)
        self.worker = SegmentWorker(settings, _device_for_worker(use_gpu), worker_name())

    def __call__(self, batch: dict) -> dict:
        columns = [key for key in batch if key != "input"]
        items = [{"input": source, **{key: str(batch[key][row]) for key in columns}}
                 for row, source in enumerate(batch["input"].tolist())]
        records = self.worker.segment_files(items)
        out = {key: np.asarray([record[key] for record in records]) for key in ("input", "output", "status", "worker")}
        out["error"] = np.asarray([record["error"] or "" for record in records])
        out["notes"] = np.asarray(["\n".join(record["notes"]) for record in records])
        out["seconds"] = np.asarray([record["seconds"] for record in records])
        return out


class RayEvalPredictor:
    """The ``map_batches`` callable class for evaluation: one ``EvalWorker`` per actor; a batch of (image,
    annotation) paths in, one row of summed ``MetricAccumulator`` counts out."""

    def __init__(self, settings: SegmentSettings, dataset, use_gpu: bool, cpus: float):
        set_threads(cpus)
        self.worker = EvalWorker(settings, dataset, _device_for_worker(use_gpu))

    def __call__(self, batch: dict) -> dict:
        accumulator = MetricAccumulator(self.worker.num_classes)
        for image_path, label_path in zip(batch["image"].tolist(), batch["label"].tolist()):
            score_sample(self.worker.predict, self.worker.dataset, Sample(Path(image_path), Path(label_path)),
                         accumulator)
        return {field: np.asarray([value]) for field, value in accumulator.counts().items()}


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


def _check_reachable(address: str | None) -> None:
    """ValueError within seconds when nothing answers at a "host:port" or "ray://host:port" address (Ray itself
    retries for minutes)."""
    if not address or address == "auto" or address == "local":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"cannot reach the Ray cluster at {address}: {reason}") from None


class _RaySession:
    """Connects to the cluster at ``address`` ("auto", "host:port", "ray://host:port") or starts a local one
    (address None, "" or "local"); leaves an already initialized Ray as it is, and shuts down only what it started."""

    def __init__(self, address: str | None):
        self.ray = import_ray()
        self.address = address or None
        self.started = False

    def __enter__(self):
        if not self.ray.is_initialized():
            _check_reachable(self.address)
            try:
                self.ray.init(address=self.address, logging_level="ERROR", log_to_driver=False,
                              configure_logging=True)
            except ConnectionError as error:
                raise ValueError(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
            self.started = True
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # a worker's error is reported once, by us
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images from the records instead
        return self.ray

    def __exit__(self, *exc_info):
        if self.started:
            self.ray.shutdown()


def _resources(ray, gpus_per_worker, cpus_per_worker: float) -> float:
    """GPUs per actor (as given, else 1 where the cluster has GPUs and 0 where it has none), after refusing a
    request that no node can meet (Ray would wait for such a node forever)."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive", True)]
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    gpus = float(gpus_per_worker) if gpus_per_worker is not None else (1.0 if most_gpus > 0 else 0.0)
    if gpus > most_gpus:
        has = f"at most {most_gpus:g} GPUs on a node" if most_gpus else "no GPUs"
        raise ValueError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {has}; use --gpus-per-worker 0 (CPU "
                         "workers) or a cluster with GPUs")
    if cpus_per_worker > most_cpus:
        raise ValueError(f"--cpus-per-worker {cpus_per_worker:g}: the Ray cluster has at most {most_cpus:g} CPUs "
                         "on a node")
    return gpus


#: A line of a traceback that states an exception: "ValueError: message" (module-qualified names too).
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.*)$")


def _worker_error(error: BaseException) -> str:
    """``Type: message`` of the error a worker raised, out of Ray's wrappers: the first exception stated in the
    traceback text Ray carries back that is not one of Ray's own (its cause chain does not survive the trip)."""
    for line in str(error).splitlines():
        raised = _RAISED.match(line.strip())
        if raised and not raised.group(1).startswith("ray."):
            return f"{raised.group(1).rsplit('.', 1)[-1]}: {raised.group(2)}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def _stream(rows):
    """Rows of a Ray Dataset; an error in the workers becomes one ValueError naming it."""
    try:
        yield from rows
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as error:
        raise ValueError(f"the Ray workers failed: {_worker_error(error)}") from None


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
    skip_existing: bool = False,
    progress: bool = True,
    on_plan=None,
    predictor_class=RaySegmentPredictor,
) -> SegmentSummary:
    """Segment image files (a path, a folder searched recursively, or a list of them) with a pool of ``workers``
    Ray actors, writing ``settings.kinds`` under ``out_dir`` as ``segformer-fast segment`` names them, and the
    manifest beside them; finished images of earlier runs are skipped (``segment.plan_segment``; ``on_plan(plan)``
    is called before the work).

    Each actor holds one engine, ``gpus_per_worker`` GPUs (default: 1 where the cluster has GPUs, else 0) and
    ``cpus_per_worker`` CPUs (its torch threads); ``batch_size`` images go to an actor at a time. ``address``: a
    running cluster ("auto", "host:6379", "ray://host:10001"), or None for a local one (Ray's ``RAY_ADDRESS``
    applies). ImportError naming the extra when ray is not installed.
    """
    check_pool(workers=workers, batch_size=batch_size, gpus_per_worker=gpus_per_worker,
               cpus_per_worker=cpus_per_worker)
    import_ray()
    settings = settings.resolved()
    checkpoint_num_labels(settings.model)  # a missing or unreadable checkpoint: one line, before Ray starts
    plan = plan_segment(inputs, out_dir, settings, retry_failed=retry_failed, skip_existing=skip_existing)
    if on_plan is not None:
        on_plan(plan)
    start = time.perf_counter()
    if not plan.todo:
        return record_results(plan, [], progress=progress, workers=workers, start=start)
    try:
        with _RaySession(address) as ray:
            gpus = _resources(ray, gpus_per_worker, cpus_per_worker)
            kinds = settings.kinds
            rows = [{"input": item["input"], **{kind: item[kind] for kind in kinds}} for item in plan.todo]
            results = _map(ray, rows, predictor_class, {"settings": settings, "use_gpu": gpus > 0,
                                                        "cpus": cpus_per_worker},
                           workers=workers, batch_size=batch_size, gpus=gpus, cpus=cpus_per_worker)
            records = ({"input": row["input"], "output": row["output"], "status": row["status"],
                        "error": row["error"] or None, "worker": row["worker"], "seconds": float(row["seconds"]),
                        "notes": [note for note in str(row["notes"]).split("\n") if note]}
                       for row in _stream(results.iter_rows()))
            return record_results(plan, records, progress=progress, workers=workers, start=start)
    except KeyboardInterrupt:  # while Ray started or shut down
        raise Interrupted(0, len(plan.todo), before=plan.done_before) from None


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
    """``evaluate.evaluate`` on a Ray actor pool: each batch's counts are computed in a worker and merged here.
    Returns the same report (``build_report``) as a single process, with exactly the same numbers."""
    check_pool(workers=workers, batch_size=batch_size, gpus_per_worker=gpus_per_worker,
               cpus_per_worker=cpus_per_worker)
    plan_evaluate(dataset, settings)
    import_ray()
    settings = settings.resolved()
    total = MetricAccumulator(dataset.num_classes)
    bar = progress_bar(len(dataset), progress, "eval")
    try:
        with _RaySession(address) as ray:
            gpus = _resources(ray, gpus_per_worker, cpus_per_worker)
            rows = [{"image": str(sample.image), "label": str(sample.label)} for sample in dataset.samples]
            loader = dataclasses.replace(dataset, samples=[])
            results = _map(ray, rows, RayEvalPredictor, {"settings": settings, "dataset": loader,
                                                         "use_gpu": gpus > 0, "cpus": cpus_per_worker},
                           workers=workers, batch_size=batch_size, gpus=gpus, cpus=cpus_per_worker)
            for row in _stream(results.iter_rows()):
                total.merge(row)
                bar.update(int(row["num_images"]))
    except KeyboardInterrupt:
        raise Interrupted(total.num_images, len(dataset), resumable=False) from None
    finally:
        bar.close()
    return build_report(total.compute(), dataset)
