"""The eval job: score a predictor on a dataset with mmseg's metrics, optionally beside a second one, and the
report (a JSON-ready dict, its file, its text summary). Every executor runs the same steps: **plan**
(:func:`plan_evaluate`: images to score, and a checkpoint whose class count is the dataset's), **work** (an
:class:`EvalWorker` and :func:`score_sample` per image), **record** (``MetricAccumulator.merge`` of the workers'
``counts()``), **summarize** (:func:`build_report`, :func:`format_summary`). :func:`evaluate` scores in this
process, with a second predictor when comparing (``jobs.local.evaluate_in_process`` runs it on a worker).

Prediction is one injectable callable, ``predict(image: PIL.Image) -> (H, W) integer labels`` at the image's own
resolution (``segformer_fast.jobs.predictors.make_predictor`` builds one from a model); datasets come from
``segformer_fast.jobs.datasets``, the metric definitions from ``segformer_fast.jobs.metrics``. The printed summary shows
percentages; the report keeps fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segformer_fast.core.fileio import atomic_write_text
from segformer_fast.core.runtime import parse_dtype
from segformer_fast.jobs.datasets import Sample, SegmentationDataset
from segformer_fast.jobs.metrics import IGNORE_INDEX, MetricAccumulator, as_numpy
from segformer_fast.jobs.predictors import make_predictor
from segformer_fast.jobs.progress import Interrupted
from segformer_fast.model.checkpoints import checkpoint_num_labels
from segformer_fast.model.segformer import Segformer

#: What the report's scores are: said in the report itself, since the printed summary shows them in percent.
UNITS = "fractions in [0, 1] (mIoU, aAcc, mAcc, IoU, Acc, agreements); the printed summary shows percent"

#: An image -> its (H, W) label map, at the image's own resolution.
Predictor = Callable[[Image.Image], np.ndarray]


def plan_evaluate(dataset: SegmentationDataset, settings) -> None:
    """The eval job's plan, made by every executor before its work: ValueError for a dataset without images, or a
    checkpoint (``settings.model``) whose class count, read from its config only
    (``model.checkpoints.checkpoint_num_labels``), differs from the dataset's."""
    if len(dataset) == 0:
        raise ValueError(f"no images to evaluate in {dataset.root}")
    num_classes = checkpoint_num_labels(settings.model)
    if num_classes != dataset.num_classes:
        raise ValueError(f"{settings.model} predicts {num_classes} classes but {dataset.format} has "
                         f"{dataset.num_classes}; use a checkpoint trained on this dataset")


def evaluate(
    predict: Predictor,
    dataset: SegmentationDataset,
    num_classes: int | None = None,
    progress: bool = True,
    reference: Predictor | None = None,
) -> dict:
    """Run ``predict`` on every image of ``dataset`` and score it against the annotations.

    ``reference``: a second predictor scored the same way; the result then has a ``comparison`` entry with its
    metrics and the pixel agreement (the fraction of valid pixels, i.e. not ignored in the label, where both predict
    the same class; ``agreement_all_pixels`` counts every pixel). Returns a JSON-ready dict (see ``build_report``)
    with NaN for undefined values.
    """
    num_classes = dataset.num_classes if num_classes is None else num_classes
    if num_classes != dataset.num_classes:
        raise ValueError(
            f"the model predicts {num_classes} classes but {dataset.format} has {dataset.num_classes}; "
            "use a checkpoint trained on this dataset"
        )
    if len(dataset) == 0:
        raise ValueError(f"no images to evaluate in {dataset.root}")
    main = MetricAccumulator(num_classes)
    other = MetricAccumulator(num_classes) if reference is not None else None
    same_valid = same_all = 0
    bar = tqdm(dataset, desc="eval", unit="img", total=len(dataset), disable=not progress, file=sys.stderr)
    try:
        for sample in bar:
            image, pred, valid = score_sample(predict, dataset, sample, main)
            if other is not None:
                ref = _check_prediction(reference(image), pred.shape, sample.image)
                other.update(ref, dataset.load_label(sample), name=str(sample.image))
                same = pred == ref
                same_valid += int(same[valid].sum())
                same_all += int(same.sum())
            if progress:
                bar.set_postfix(mIoU=f"{100 * main.compute()['mIoU']:.2f}")
    except KeyboardInterrupt:
        raise Interrupted(main.num_images, len(dataset), resumable=False) from None
    finally:
        bar.close()
    result = build_report(main.compute(), dataset)
    if other is not None:
        metrics = other.compute()
        stats = main.compute()
        result["comparison"] = {
            "against": "reference",
            "mIoU": result["mIoU"],
            "reference_mIoU": metrics["mIoU"],
            "reference_aAcc": metrics["aAcc"],
            "reference_mAcc": metrics["mAcc"],
            "mIoU_difference": result["mIoU"] - metrics["mIoU"],
            "pixel_agreement": same_valid / stats["num_valid_pixels"] if stats["num_valid_pixels"] else float("nan"),
            "agreement_all_pixels": same_all / stats["num_pixels"],
            "reference_per_class_IoU": [float(v) for v in metrics["IoU"]],
        }
    return result


def compare(
    predict: Predictor,
    reference: Predictor,
    dataset: SegmentationDataset,
    num_classes: int | None = None,
    progress: bool = True,
) -> dict:
    """``evaluate`` of ``predict`` with ``reference`` scored alongside: both mIoUs and their pixel agreement."""
    return evaluate(predict, dataset, num_classes, progress=progress, reference=reference)


def score_sample(predict: Predictor, dataset: SegmentationDataset, sample: Sample,
                 accumulator: MetricAccumulator) -> tuple:
    """Score one image into ``accumulator``: (image, prediction, valid-pixel mask). ValueError naming the files for
    an annotation whose size differs from the image's, or a prediction of the wrong shape."""
    image = dataset.load_image(sample)
    label = dataset.load_label(sample)
    if label.shape != (image.height, image.width):
        raise ValueError(
            f"{sample.label}: annotation size {label.shape[1]}x{label.shape[0]} differs from the image "
            f"{sample.image} ({image.width}x{image.height}, W x H)"
        )
    pred = _check_prediction(predict(image), label.shape, sample.image)
    return image, pred, accumulator.update(pred, label, name=str(sample.image))


class EvalWorker:
    """The work of an eval job in one process: the checkpoint's predictor built once for ``settings`` (a
    ``SegmentSettings``) on ``device``, and with ``compare`` ("reference" or "transformers") a second predictor of
    the same model, settings and device (``reference``; else None); ``dataset`` gives the label loading
    (reduce_zero_label, Cityscapes trainIds)."""

    def __init__(self, settings, dataset: SegmentationDataset, device, compare: str | None = None):
        model = Segformer.from_pretrained(settings.model).to(device=device).eval()
        self.dataset = dataset
        self.num_classes = model.config.num_labels
        options = {"crop": settings.crop, "stride": settings.stride} if settings.mode == "slide" else {}
        options.update(resize=settings.resize(), device=device, dtype=parse_dtype(settings.dtype))
        # The engine is built first: the reference predictor casts the model to dtype in place.
        self.predict = make_predictor(model, settings.engine, settings.mode, **options)
        self.reference = make_predictor(model, compare, settings.mode, **options) if compare else None

    def score(self, samples, progress=None) -> MetricAccumulator:
        """The counts of ``samples``; ``progress()`` after each image."""
        accumulator = MetricAccumulator(self.num_classes)
        for sample in samples:
            score_sample(self.predict, self.dataset, sample, accumulator)
            if progress is not None:
                progress()
        return accumulator


def _check_prediction(pred, shape: tuple, image_path: Path) -> np.ndarray:
    pred = as_numpy(pred)
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred = pred[0]
    if pred.shape != tuple(shape):
        raise ValueError(f"{image_path}: the predictor returned shape {pred.shape}, expected {tuple(shape)} (H, W)")
    return pred


def build_report(metrics: dict, dataset: SegmentationDataset) -> dict:
    """A JSON-ready report from ``MetricAccumulator.compute()``'s result for ``dataset``."""
    names = dataset.class_names
    if len(names) != len(metrics["IoU"]):
        names = tuple(f"class {i}" for i in range(len(metrics["IoU"])))
    per_class = [
        {
            "id": i,
            "name": names[i],
            "IoU": float(metrics["IoU"][i]),
            "Acc": float(metrics["Acc"][i]),
            "label_pixels": int(metrics["area_label"][i]),
            "pred_pixels": int(metrics["area_pred"][i]),
            "intersection": int(metrics["area_intersect"][i]),
            "union": int(metrics["area_union"][i]),
        }
        for i in range(len(names))
    ]
    return {
        "units": UNITS,
        "mIoU": metrics["mIoU"],
        "aAcc": metrics["aAcc"],
        "mAcc": metrics["mAcc"],
        "dataset": {
            "format": dataset.format,
            "root": str(dataset.root),
            "num_classes": dataset.num_classes,
            "reduce_zero_label": dataset.reduce_zero_label,
            "ignore_index": IGNORE_INDEX,
        },
        "counts": {
            "images": metrics["num_images"],
            "pixels": metrics["num_pixels"],
            "valid_pixels": metrics["num_valid_pixels"],
            "ignored_pixels": metrics["num_ignored_pixels"],
            "classes_present": int(np.count_nonzero(metrics["area_label"])),
            "classes_scored": int(np.count_nonzero(~np.isnan(metrics["IoU"]))),
        },
        "per_class": per_class,
    }


def _json_ready(value):
    """NaN / inf -> None, numpy scalars and arrays -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(result: dict, path: str | os.PathLike) -> None:
    """Write ``result`` as indented JSON to ``path`` atomically (missing folders created); NaN (undefined metrics)
    become ``null``."""
    text = json.dumps(_json_ready(result), indent=2, allow_nan=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")


def _percent(value: float) -> str:
    return "   n/a" if value is None or not math.isfinite(value) else f"{100 * value:6.2f}"


def format_summary(result: dict, top: int = 5) -> str:
    """A short text table: mIoU (and over how many classes: mmseg averages the classes with a defined IoU, those in
    the labels or the predictions), aAcc, mAcc, the best and worst classes, and the comparison when present."""
    num_classes = result["dataset"]["num_classes"]
    scored = [c for c in result["per_class"] if c["IoU"] is not None and math.isfinite(c["IoU"])]
    lines = [
        f"images: {result['counts']['images']}  valid pixels: {result['counts']['valid_pixels']}  "
        f"classes present: {result['counts']['classes_present']}/{num_classes}",
        f"mIoU  {_percent(result['mIoU'])} % over {len(scored)} of {num_classes} classes"
        + (" (the others are in neither the labels nor the predictions)" if len(scored) < num_classes else ""),
        f"aAcc  {_percent(result['aAcc'])} %",
        f"mAcc  {_percent(result['mAcc'])} %",
    ]
    scored.sort(key=lambda c: (-c["IoU"], c["id"]))
    if scored:
        n = min(top, len(scored))
        best = ", ".join(f"{c['name']} {100 * c['IoU']:.1f}" for c in scored[:n])
        lines.append(f"top {n} classes (IoU %):    {best}")
        lines.append(f"bottom {n} classes (IoU %): " + ", ".join(
            f"{c['name']} {100 * c['IoU']:.1f}" for c in reversed(scored[-n:])))
    comparison = result.get("comparison")
    if comparison:
        lines.append(
            f"vs {comparison['against']}: mIoU {_percent(comparison['mIoU'])} % vs "
            f"{_percent(comparison['reference_mIoU'])} %"
            f" (difference {100 * comparison['mIoU_difference']:+.3f} points), pixel agreement "
            f"{100 * comparison['pixel_agreement']:.4f} %"
        )
    return "\n".join(lines)
