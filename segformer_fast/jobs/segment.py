"""Scale-out building blocks shared by the Ray jobs (``ray_segment``) and torchrun (``distributed``).

The work of one worker is the same everywhere: :class:`ImageSegmenter` loads the checkpoint once, builds the
engine (``optimize`` verifies it against the reference, as always), and for a batch of input paths decodes each
image, segments the decoded ones in one ``segment_images`` call and writes each label PNG (and overlay) atomically
under the name ``segment`` gives it (``outputs.label_paths``), returning one manifest record per image. A file that
cannot be decoded or segmented becomes a failed record; the batch goes on.

The manifest (``manifest.jsonl`` beside the outputs) holds one JSON line per processed image: ``input`` (absolute
path), ``output`` (the label PNG), ``status`` ("ok" or "failed"), ``error`` (null or the reason), ``worker``
(host:pid) and ``seconds``. Only the driver (Ray) or rank 0 (torchrun) writes it, appending a flushed line per image
as results arrive (rewriting it per batch would cost O(images²)); a line cut short by a crash is ignored when it is
read. A re-run skips every input whose latest record is "ok" with its outputs present, and every "failed" one unless
``retry_failed``.

Evaluation: each worker scores its images with a ``MetricAccumulator``; its integer counts (per-class intersection,
prediction and label areas, image and pixel counts; ``COUNT_FIELDS``) are summed across workers, so the metrics
equal the single-process result exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .datasets import Sample
from .fileio import atomic_path, check_output_folder, find_images, load_image
from .inference import resolve_window, segment_images
from .metrics import MetricAccumulator
from .model import Segformer
from .outputs import describe_error, label_paths, output_stems, save_label_png
from .palettes import overlay, palette_for
from .predictors import build_forward
from .runtime import parse_dtype

MANIFEST_NAME = "manifest.jsonl"
INSTALL_HINT = "pip install segformer-fast[scaleout]"
#: The MetricAccumulator totals a worker sends back and the driver sums.
COUNT_FIELDS = ("area_intersect", "area_pred", "area_label", "num_images", "num_pixels", "num_ignored")


def import_ray():
    """The ``ray`` module with Ray Data; ImportError naming the extra to install when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate part of the ray package)
    except ImportError as error:
        raise ImportError(f"scaling out with Ray needs ray with Ray Data: {INSTALL_HINT} "
                          f"(or pip install 'ray[data]'); import failed: {error}") from None
    return ray


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    """What every worker needs to build its engine and segment like ``segformer-fast segment``.

    model: checkpoint source (folder, weights file or hub id) readable by every worker. engine: "fast",
    "reference" or "transformers". dtype: "fp32", "fp16" or "bf16". Resizing as ``segment_images``: ``short_side``
    (keep ratio, ``max_long_side``), else ``size`` (H, W), else none. mode "whole", "slide" or "auto" with
    ``crop`` / ``stride``. overlay: also write ``<name>_overlay.png`` with label colors weighted ``alpha``.
    """

    model: str
    engine: str = "fast"
    dtype: str = "fp32"
    size: tuple | None = (512, 512)
    short_side: int | None = None
    max_long_side: int | None = None
    mode: str = "whole"
    crop: tuple | None = None
    stride: tuple | None = None
    overlay: bool = False
    alpha: float = 0.5

    def resize(self) -> dict:
        if self.short_side:
            return {"short_side": self.short_side, "max_long_side": self.max_long_side, "size": None}
        return {"size": tuple(self.size) if self.size else None}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------------------------ the worker
class ImageSegmenter:
    """One engine, built once; segments batches of files and writes their outputs.

    ``segment_files(items)`` takes (input path, labels path, overlay path or "") triples and returns one manifest
    record per item, in order.
    """

    def __init__(self, settings: SegmentSettings, device, worker: str):
        self.settings = settings
        self.worker = worker
        self.device = torch.device(device)
        self.dtype = parse_dtype(settings.dtype)
        self.crop, self.stride = resolve_window(settings.crop, settings.stride)
        model = Segformer.from_pretrained(settings.model).to(device=self.device)
        self.num_labels = model.config.num_labels
        self.palette = palette_for(self.num_labels)
        self.forward, self.whole_labels = build_forward(model, settings.engine, self.dtype)

    def _labels(self, images: list) -> list:
        """(H, W) numpy label maps for decoded images, the same-size ones in one forward."""
        with torch.inference_mode():
            labels = segment_images(images, self.forward, num_labels=self.num_labels, device=self.device,
                                    dtype=self.dtype, mode=self.settings.mode, crop=self.crop, stride=self.stride,
                                    whole_labels=self.whole_labels, **self.settings.resize())
        return [label.cpu().numpy() for label in labels]

    def _write(self, image, labels: np.ndarray, labels_path: Path, overlay_path: str) -> None:
        labels_path.parent.mkdir(parents=True, exist_ok=True)
        save_label_png(labels, self.palette, labels_path)
        if overlay_path:
            with atomic_path(overlay_path) as temporary:
                overlay(image, labels, self.palette, alpha=self.settings.alpha).save(temporary, format="PNG")

    def segment_files(self, items: list) -> list:
        records = [{"input": str(source), "output": str(labels), "status": "ok", "error": None,
                    "worker": self.worker, "seconds": 0.0} for source, labels, _ in items]
        decoded = []  # (index, image)
        for index, (source, _, _) in enumerate(items):
            start = time.perf_counter()
            try:
                decoded.append((index, load_image(source)))
            except (ValueError, OSError) as error:
                records[index].update(status="failed", error=describe_error(error))
            records[index]["seconds"] += time.perf_counter() - start
        if not decoded:
            return records
        start = time.perf_counter()
        try:
            all_labels = self._labels([image for _, image in decoded])
        except Exception:  # a batch-level failure (say out of memory): try each image alone to find the bad one
            all_labels = None
        if all_labels is not None:
            share = (time.perf_counter() - start) / len(decoded)
            for index, _ in decoded:
                records[index]["seconds"] += share
        for position, (index, image) in enumerate(decoded):
            start = time.perf_counter()
            source, labels_path, overlay_path = items[index]
            try:
                labels = all_labels[position] if all_labels is not None else self._labels([image])[0]
                self._write(image, labels, Path(labels_path), overlay_path)
            except Exception as error:  # one bad image (out of memory, unwritable output, ...) must not stop the run
                records[index].update(status="failed", error=describe_error(error))
            records[index]["seconds"] += time.perf_counter() - start
        return records


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(path: Path) -> dict:
    """The latest record of each input in a manifest (empty when there is none); a torn last line is skipped."""
    latest = {}
    if not path.is_file():
        return latest
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line the writer did not finish (the job was killed mid-write)
            if not isinstance(record, dict) or "input" not in record or "status" not in record:
                raise ValueError(f"{path}, line {number}: not a segformer-fast manifest record: {line[:80]}")
            latest[record["input"]] = record
    return latest


class ManifestWriter:
    """Appends records to the manifest, one flushed JSON line each."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclasses.dataclass
class SegmentPlan:
    """A segmentation job: every input, the ones still to do (as worker items), and the earlier failures kept."""

    out_dir: Path
    images: list
    todo: list  # (absolute input path, labels path, overlay path or "")
    done_before: int
    failed_before: list  # records

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME


def plan_segment(inputs, out_dir, with_overlay: bool, retry_failed: bool = False) -> SegmentPlan:
    """Find the images (files, folders searched recursively) and leave out those the manifest says are finished.

    The same rules as ``segment``: an output folder that is or holds an input folder is refused, one inside an input
    folder is never read as input, and inputs whose outputs would collide are refused before anything runs.
    ValueError when no images are found; FileNotFoundError for a missing input."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, inputs)
    images = find_images(inputs, exclude=[out_dir])
    if not images:
        raise ValueError("no images found in " + ", ".join(str(p) for p in inputs))
    roots = [Path(p) for p in inputs]
    output_stems(images, roots)
    previous = read_manifest(out_dir / MANIFEST_NAME)
    todo, done_before, failed_before = [], 0, []
    for image in images:
        source = str(image.resolve())
        labels, overlay_path = label_paths(out_dir, image, roots)
        record = previous.get(source)
        finished = record is not None and record["status"] == "ok" and labels.is_file() and (
            not with_overlay or overlay_path.is_file())
        if finished:
            done_before += 1
        elif record is not None and record["status"] == "failed" and not retry_failed:
            failed_before.append(record)
        else:
            todo.append((source, str(labels.resolve()), str(overlay_path.resolve()) if with_overlay else ""))
    return SegmentPlan(out_dir, images, todo, done_before, failed_before)


@dataclasses.dataclass
class SegmentSummary:
    """What a scale-out segmentation did; ``failed`` holds the failure records of this run, ``failed_before`` the
    earlier ones a resume kept (``retry_failed`` tries them again)."""

    out_dir: Path
    total: int
    done_before: int
    succeeded: int
    failed: list
    failed_before: list
    seconds: float
    workers: int
    report: bool = True  # False on torchrun ranks other than 0, which print nothing

    @property
    def processed(self) -> int:
        return self.succeeded + len(self.failed)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.failed_before else 0

    def format(self) -> str:
        ok = self.done_before + self.succeeded
        note = f" ({self.done_before} already done, skipped)" if self.done_before else ""
        lines = [f"segmented {ok} of {self.total} images into {self.out_dir}{note}"]
        if self.processed:
            lines.append(f"{self.processed} images in {self.seconds:.1f} s: {self.images_per_second:.2f} images/s "
                         f"with {self.workers} worker{'s' if self.workers != 1 else ''}")
        if self.failed:
            lines.append(f"{len(self.failed)} images failed (recorded in {self.out_dir / MANIFEST_NAME}):")
            lines += [f"  {record['input']}: {record['error']}" for record in self.failed]
        if self.failed_before:
            lines.append(f"{len(self.failed_before)} images failed in an earlier run (--retry-failed tries them "
                         f"again):")
            lines += [f"  {record['input']}: {record['error']}" for record in self.failed_before]
        return "\n".join(lines)


def progress_bar(total: int, enabled: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr)


def record_results(plan: SegmentPlan, records, progress: bool, workers: int, start: float) -> SegmentSummary:
    """Append each record to the manifest as it arrives, advance the progress bar, and summarize."""
    writer = ManifestWriter(plan.manifest)
    bar = progress_bar(len(plan.todo), progress, "segment")
    succeeded, failed = 0, []
    try:
        for record in records:
            writer.write(record)
            bar.update(1)
            if record["status"] == "ok":
                succeeded += 1
            else:
                failed.append(record)
    finally:
        bar.close()
        writer.close()
    return SegmentSummary(plan.out_dir, len(plan.images), plan.done_before, succeeded, failed, plan.failed_before,
                          time.perf_counter() - start, workers)


# ------------------------------------------------------------------------------------------------ evaluation
def score_sample(predict, dataset, sample: Sample) -> dict:
    """The ``MetricAccumulator`` counts of one image (errors as ``evaluation.evaluate`` raises them)."""
    image = dataset.load_image(sample)
    label = dataset.load_label(sample)
    if label.shape != (image.height, image.width):
        raise ValueError(f"{sample.label}: annotation size {label.shape[1]}x{label.shape[0]} differs from the image "
                         f"{sample.image} ({image.width}x{image.height}, W x H)")
    accumulator = MetricAccumulator(dataset.num_classes)
    accumulator.update(predict(image), label, name=str(sample.image))
    return {field: getattr(accumulator, field) for field in COUNT_FIELDS}


def add_counts(accumulator: MetricAccumulator, counts: dict) -> None:
    """Add another accumulator's integer totals (``COUNT_FIELDS``) to ``accumulator``."""
    accumulator.area_intersect = accumulator.area_intersect + np.asarray(counts["area_intersect"], dtype=np.int64)
    accumulator.area_pred = accumulator.area_pred + np.asarray(counts["area_pred"], dtype=np.int64)
    accumulator.area_label = accumulator.area_label + np.asarray(counts["area_label"], dtype=np.int64)
    accumulator.num_images += int(counts["num_images"])
    accumulator.num_pixels += int(counts["num_pixels"])
    accumulator.num_ignored += int(counts["num_ignored"])



# ------------------------------------------------------------------------------------------------ processes
def set_threads(cpus: float) -> None:
    """torch threads for a worker holding ``cpus`` CPUs (at least one)."""
    torch.set_num_threads(max(1, int(cpus)))


def torchrun_world() -> tuple | None:
    """(rank, local_rank, world_size) when this process was started by torchrun (its environment), else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them), got "
                         f"{os.environ.get('RANK')!r}, {os.environ.get('LOCAL_RANK')!r}, "
                         f"{os.environ.get('WORLD_SIZE')!r}") from None


def check_model_classes(model_source: str, dataset) -> None:
    """ValueError when the checkpoint's class count differs from the dataset's (read from its config only)."""
    num_classes = Segformer.from_pretrained(model_source).config.num_labels
    if num_classes != dataset.num_classes:
        raise ValueError(f"{model_source} predicts {num_classes} classes but {dataset.format} has "
                         f"{dataset.num_classes}; use a checkpoint trained on this dataset")
