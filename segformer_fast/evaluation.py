"""mIoU evaluation on ADE20K and Cityscapes, with mmseg's metric definitions.

Metrics (mmseg ``intersect_and_union`` / ``mean_iou``): over the whole dataset, per class ``c``::

    intersect[c] = #pixels with pred == label == c          pred_area[c]  = #pixels with pred == c
    label_area[c] = #pixels with label == c                  union[c]      = pred_area[c] + label_area[c] - intersect[c]

counted only where the label is not the ignore index (255), and summed over all images before dividing (so large
images weigh more, as in mmseg). Then ``IoU[c] = intersect / union`` (NaN when the union is empty: the class is in
neither the labels nor the predictions), ``Acc[c] = intersect / label_area`` (NaN when the class is absent from the
labels), ``mIoU`` / ``mAcc`` are the means over the non-NaN classes (numpy ``nanmean``, as mmseg), and ``aAcc`` is
``sum(intersect) / sum(label_area)`` (correct pixels / valid pixels). Values are fractions in [0, 1]; the printed
table shows percentages. ``reduce_zero_label`` (ADE20K) maps label 0 ("other") to 255 and every other label ``l``
to ``l - 1`` (255 stays 255) before counting.

Datasets (``open_dataset``):

- ``ade20k``: ``DIR/images/validation/*.jpg`` with ``DIR/annotations/validation/*.png`` (ADEChallengeData2016), or
  ``DIR/images/*.jpg`` with ``DIR/annotations/*.png``. Labels 0..150 with 0 = "other", reduced to 150 classes with
  ``reduce_zero_label``.
- ``cityscapes``: ``DIR/leftImg8bit/val/<city>/*_leftImg8bit.png`` with ``DIR/gtFine/val/<city>/*_gtFine_labelIds.png``
  (mapped to the 19 trainIds with the official cityscapesScripts table; every other id -> 255), or, when no labelIds
  file is there, a ready ``*_gtFine_labelTrainIds.png``.

Prediction is one injectable callable, ``predict(image: PIL.Image) -> (H, W) integer labels`` at the image's own
resolution; ``make_predictor`` builds it from a model and an engine choice (``fast``, ``reference``,
``transformers``) and an inference mode (``whole``: resize, one forward, upsample the logits to the image size and
argmax; ``slide``: sliding windows), both through ``segformer_fast.inference.segment_images``.

Default resizing (``default_resize``): ADE20K uses mmseg's test pipeline, keep ratio with short side 512 and long side
at most 2048 (``img_scale=(2048, 512)``); Cityscapes keep ratio with short side 1024 and long side at most 2048
(``img_scale=(2048, 1024)``), which leaves the native 1024x2048 Cityscapes images as they are (whole-image inference
at full resolution; the published SegFormer Cityscapes numbers use sliding-window inference, ``--mode slide``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_write_text, load_image
from .inference import ENGINES
from .palettes import ADE20K_CLASSES, CITYSCAPES_CLASSES
from .runtime import DTYPES, resolve_device

IGNORE_INDEX = 255

#: An image -> its (H, W) label map, at the image's own resolution.
Predictor = Callable[[Image.Image], np.ndarray]

FORMATS = ("ade20k", "cityscapes")
MODES = ("whole", "slide")

#: Cityscapes labelIds -> trainIds for the 19 evaluated classes (cityscapesScripts ``labels.py``); all other ids,
#: including "unlabeled" (0), the void classes, and the classes not evaluated (parking, rail track, guard rail,
#: bridge, tunnel, polegroup, caravan, trailer, license plate) map to 255.
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def cityscapes_label_table() -> np.ndarray:
    """(256,) uint8 lookup table: labelId -> trainId (255 for ids that are not evaluated)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255, l -> l - 1 for 1 <= l <= 254, 255 stays 255. Returns a new array."""
    label = np.asarray(label)
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


# ------------------------------------------------------------------------------------------------------- metrics
def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


class MetricAccumulator:
    """Per-class intersection / union / prediction area / label area totals over a dataset (mmseg definitions).

    ``update(pred, label)`` adds one image; ``compute()`` gives IoU, Acc, mIoU, mAcc, aAcc. Totals are int64, the
    ratios float64. Predictions must lie in [0, num_classes); labels in [0, num_classes) or ``ignore_index``
    (anything else raises: it means a wrong ``num_classes`` or a label mapping that was not applied).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, reduce_zero_label: bool = False):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.area_intersect = np.zeros(k, dtype=np.int64)
        self.area_pred = np.zeros(k, dtype=np.int64)
        self.area_label = np.zeros(k, dtype=np.int64)
        self.num_images = 0
        self.num_pixels = 0
        self.num_ignored = 0

    @property
    def area_union(self) -> np.ndarray:
        return self.area_pred + self.area_label - self.area_intersect

    def update(self, pred, label, name: str | None = None) -> np.ndarray:
        """Add one image: ``pred`` and ``label`` (H, W) integer arrays (numpy or torch). Returns the valid mask."""
        pred = _as_numpy(pred)
        label = _as_numpy(label)
        where = f" ({name})" if name else ""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}{where}")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(label.dtype, np.integer)):
            raise ValueError(f"pred and label must be integer arrays, got {pred.dtype} and {label.dtype}{where}")
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        valid = label != self.ignore_index
        pred_valid = pred[valid].astype(np.int64, copy=False)
        label_valid = label[valid].astype(np.int64, copy=False)
        k = self.num_classes
        if label_valid.size:
            lo, hi = int(label_valid.min()), int(label_valid.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"label value {bad} is neither a class in [0, {k}) nor the ignore index {self.ignore_index}{where}"
                )
            lo, hi = int(pred_valid.min()), int(pred_valid.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise ValueError(f"predicted label {bad} is outside [0, {k}){where}")
        hits = pred_valid[pred_valid == label_valid]
        self.area_intersect += np.bincount(hits, minlength=k)
        self.area_pred += np.bincount(pred_valid, minlength=k)
        self.area_label += np.bincount(label_valid, minlength=k)
        self.num_images += 1
        self.num_pixels += int(label.size)
        self.num_ignored += int(label.size - label_valid.size)
        return valid

    def compute(self) -> dict:
        """Metrics so far: ``mIoU``, ``aAcc``, ``mAcc`` (floats, NaN when undefined), ``IoU`` and ``Acc`` ((K,)
        float64 arrays, NaN for undefined classes), the int64 areas, and the image and pixel counts."""
        intersect = self.area_intersect.astype(np.float64)
        union = self.area_union.astype(np.float64)
        label = self.area_label.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersect / union, np.nan)
            acc = np.where(label > 0, intersect / label, np.nan)
        valid = int(self.area_label.sum())
        return {
            "mIoU": _nanmean(iou),
            "aAcc": float(self.area_intersect.sum() / valid) if valid else float("nan"),
            "mAcc": _nanmean(acc),
            "IoU": iou,
            "Acc": acc,
            "area_intersect": self.area_intersect.copy(),
            "area_union": self.area_union,
            "area_pred": self.area_pred.copy(),
            "area_label": self.area_label.copy(),
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "num_valid_pixels": valid,
            "num_ignored_pixels": self.num_ignored,
        }


ConfusionAccumulator = MetricAccumulator  # the name used in some call sites


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


# ------------------------------------------------------------------------------------------------------ datasets
@dataclasses.dataclass(frozen=True)
class Sample:
    image: Path
    label: Path


@dataclasses.dataclass
class SegmentationDataset:
    """Image / annotation pairs of one dataset layout; ``load_label`` returns labels in [0, K) or 255."""

    format: str
    root: Path
    samples: list
    num_classes: int
    class_names: tuple
    reduce_zero_label: bool = False
    label_table: np.ndarray | None = None  # (256,) lookup applied to raw label values, or None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def limit(self, n: int | None) -> "SegmentationDataset":
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"limit must be a positive integer, got {n!r}")
        return dataclasses.replace(self, samples=self.samples[:n])

    def load_image(self, sample: Sample) -> Image.Image:
        return load_image(sample.image)

    def load_label(self, sample: Sample) -> np.ndarray:
        """The annotation as an (H, W) array of class ids in [0, num_classes) or 255 (mapped / reduced)."""
        raw = read_label_png(sample.label)
        if self.label_table is not None:
            return self.label_table[raw]
        if self.reduce_zero_label:
            return reduce_zero_label(raw).astype(np.uint8)
        return raw


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A single-channel label image (L, P, or 16-bit / 32-bit grayscale with values <= 255) as (H, W) uint8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.array(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read annotation {path}: {err}") from None
    if array.ndim != 2:
        raise ValueError(f"annotation {path}: expected a single-channel label image (mode L or P), got mode {mode}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"annotation {path}: label values must be in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return array


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{what} is not a folder: {path}")
    return path


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files under ``folder`` (recursive, hidden names skipped) whose name ends with one of ``suffixes``, sorted."""
    found = []
    for current, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(tuple(s.lower() for s in suffixes)):
                found.append(Path(current) / name)
    return sorted(found, key=lambda p: p.parts)


def _missing_error(missing: list, total: int, hint: str) -> ValueError:
    shown = ", ".join(str(p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return ValueError(f"{len(missing)} of {total} images have no annotation ({hint}): {shown}{more}")


def ade20k_dataset(root: str | os.PathLike, split: str = "validation") -> SegmentationDataset:
    """ADE20K (SceneParsing): ``root/images/<split>/*.jpg`` + ``root/annotations/<split>/*.png``, or
    ``root/images/*.jpg`` + ``root/annotations/*.png``. Labels 0..150 (0 = other) -> 150 classes (reduce_zero_label)."""
    root = _require_dir(Path(root), "ADE20K folder")
    images_dir = _require_dir(root / "images", "ADE20K images folder")
    annotations_dir = _require_dir(root / "annotations", "ADE20K annotations folder")
    if (images_dir / split).is_dir():
        images_dir = images_dir / split
        annotations_dir = _require_dir(annotations_dir / split, "ADE20K annotations folder")
    elif (images_dir / "training").is_dir():
        raise FileNotFoundError(f"ADE20K {split} images folder not found: {images_dir / split}")
    images = _files(images_dir, (".jpg", ".jpeg", ".png"))
    if not images:
        raise ValueError(f"no images (*.jpg) found in {images_dir}")
    samples, missing = [], []
    for image in images:
        label = annotations_dir / image.relative_to(images_dir).with_suffix(".png")
        if label.is_file():
            samples.append(Sample(image, label))
        else:
            missing.append(image)
    if missing:
        raise _missing_error(missing, len(images), f"expected <name>.png in {annotations_dir}")
    return SegmentationDataset("ade20k", root, samples, len(ADE20K_CLASSES), ADE20K_CLASSES, reduce_zero_label=True)


def cityscapes_dataset(root: str | os.PathLike, split: str = "val") -> SegmentationDataset:
    """Cityscapes: ``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``root/gtFine/<split>/<city>/`` with
    ``*_gtFine_labelIds.png`` (mapped to trainIds) or, failing that, ``*_gtFine_labelTrainIds.png``."""
    root = _require_dir(Path(root), "Cityscapes folder")
    images_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes images folder")
    gt_dir = _require_dir(root / "gtFine" / split, "Cityscapes annotations folder")
    suffix = "_leftImg8bit.png"
    images = _files(images_dir, (suffix,))
    if not images:
        raise ValueError(f"no images (*{suffix}) found in {images_dir}")
    samples, missing = [], []
    trainid_files = 0
    for image in images:
        relative = image.relative_to(images_dir)
        stem = relative.name[: -len(suffix)]
        label_ids = gt_dir / relative.parent / f"{stem}_gtFine_labelIds.png"
        train_ids = gt_dir / relative.parent / f"{stem}_gtFine_labelTrainIds.png"
        if label_ids.is_file():
            samples.append(Sample(image, label_ids))
        elif train_ids.is_file():
            samples.append(Sample(image, train_ids))
            trainid_files += 1
        else:
            missing.append(image)
    if missing:
        raise _missing_error(
            missing, len(images), f"expected <name>_gtFine_labelIds.png or _gtFine_labelTrainIds.png in {gt_dir}"
        )
    return _CityscapesDataset("cityscapes", root, samples, len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES,
                              label_table=cityscapes_label_table())


class _CityscapesDataset(SegmentationDataset):
    """labelIds files go through the trainId table; labelTrainIds files are used as they are."""

    def load_label(self, sample: Sample) -> np.ndarray:
        raw = read_label_png(sample.label)
        if sample.label.name.endswith("_gtFine_labelTrainIds.png"):
            return raw
        return self.label_table[raw]


def open_dataset(format: str, root: str | os.PathLike, limit: int | None = None) -> SegmentationDataset:
    """The dataset of ``format`` ("ade20k" or "cityscapes") at ``root``, limited to its first ``limit`` images."""
    if format == "ade20k":
        dataset = ade20k_dataset(root)
    elif format == "cityscapes":
        dataset = cityscapes_dataset(root)
    else:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {FORMATS}")
    return dataset.limit(limit)


# ---------------------------------------------------------------------------------------------------- evaluation
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
    from tqdm import tqdm

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
    for sample in bar:
        image = dataset.load_image(sample)
        label = dataset.load_label(sample)
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"{sample.label}: annotation size {label.shape[1]}x{label.shape[0]} differs from the image "
                f"{sample.image} ({image.width}x{image.height}, W x H)"
            )
        pred = _check_prediction(predict(image), label.shape, sample.image)
        valid = main.update(pred, label, name=str(sample.image))
        if other is not None:
            ref = _check_prediction(reference(image), label.shape, sample.image)
            other.update(ref, label, name=str(sample.image))
            same = pred == ref
            same_valid += int(same[valid].sum())
            same_all += int(same.sum())
        if progress:
            bar.set_postfix(mIoU=f"{100 * main.compute()['mIoU']:.2f}")
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


def _check_prediction(pred, shape: tuple, image_path: Path) -> np.ndarray:
    pred = _as_numpy(pred)
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
    """Write ``result`` as indented JSON to ``path`` atomically; NaN (undefined metrics) become ``null``."""
    text = json.dumps(_json_ready(result), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


# ---------------------------------------------------------------------------------------------------- predictors
def default_resize(format: str) -> dict:
    """The ``preprocess`` resize arguments of mmseg's test pipeline for ``format`` (see the module docstring)."""
    if format == "ade20k":
        return {"short_side": 512, "max_long_side": 2048}
    if format == "cityscapes":
        return {"short_side": 1024, "max_long_side": 2048}
    raise ValueError(f"unknown dataset format {format!r}; expected one of {FORMATS}")


def default_window(format: str) -> dict:
    """Sliding-window crop and stride of the SegFormer test configs: Cityscapes 1024x1024 windows 768 apart; ADE20K
    512x512 windows 341 apart (mmseg's slide setting for 512 crops)."""
    if format == "cityscapes":
        return {"crop": (1024, 1024), "stride": (768, 768)}
    if format == "ade20k":
        return {"crop": (512, 512), "stride": (341, 341)}
    raise ValueError(f"unknown dataset format {format!r}; expected one of {FORMATS}")


def make_predictor(
    model,
    engine: str = "fast",
    mode: str = "whole",
    *,
    resize: dict | None = None,
    device=None,
    dtype=None,
    crop=None,
    stride=None,
    windows_per_call: int = 1,
) -> Predictor:
    """A ``Predictor`` for a reference ``Segformer`` (already on ``device``) through
    :func:`segformer_fast.inference.segment_images`: ``engine`` as in ``inference.build_forward`` ("fast",
    "reference", "transformers"), ``mode`` "whole" (resize, one forward, upsample the logits to the image size and
    argmax) or "slide" (sliding windows of ``crop`` every ``stride``), ``resize`` the resize arguments
    (``size`` or ``short_side``/``max_long_side``; default: fixed 512x512)."""
    import torch

    from .inference import build_forward, segment_images

    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; available: {list(MODES)}")
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else model.device
    forward, whole_labels = build_forward(model, engine, dtype)
    options = dict(resize) if resize else {"size": (512, 512)}

    def predict(image: Image.Image) -> np.ndarray:
        with torch.inference_mode():
            labels = segment_images(image, forward, num_labels=model.config.num_labels, device=device, dtype=dtype,
                                    mode=mode, crop=crop, stride=stride, whole_labels=whole_labels,
                                    windows_per_call=windows_per_call, **options)
        return labels.cpu().numpy()

    return predict


# ------------------------------------------------------------------------------------------------------------ CLI
def add_eval_arguments(parser) -> None:
    """The ``segformer-fast eval`` options (``run_eval`` takes the parsed namespace)."""
    parser.add_argument("--model", required=True, metavar="SRC", help="checkpoint: folder, weights file or hub id")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="ade20k: DIR/images/validation + DIR/annotations/validation (or DIR/images + "
                             "DIR/annotations); cityscapes: DIR/leftImg8bit/val + DIR/gtFine/val")
    parser.add_argument("--engine", default="fast", choices=ENGINES, help="model to evaluate (default fast)")
    parser.add_argument("--mode", default="whole", choices=MODES,
                        help="whole: one forward per image (default); slide: sliding-window inference")
    resize = parser.add_mutually_exclusive_group()
    resize.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="resize every image to H x W (transformers' processor)")
    resize.add_argument("--short-side", type=int, metavar="N",
                        help="keep-ratio resize to short side N (long side capped by --max-long-side, default 2048), "
                             "sides rounded up to multiples of 32. Default without --size / --short-side: mmseg's "
                             "test resize, ade20k short side 512, cityscapes short side 1024 (native 1024x2048 "
                             "images are not resized), long side at most 2048")
    parser.add_argument("--max-long-side", type=int, metavar="N", help="with --short-side: cap the long side "
                        "(default 2048)")
    parser.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                        help="--mode slide window size (default: cityscapes 1024 1024, ade20k 512 512)")
    parser.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"),
                        help="--mode slide window step (default: cityscapes 768 768, ade20k 341 341)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--compare", choices=["reference", "transformers"],
                        help="also evaluate this model (same device, dtype, resize and mode) and report both mIoUs "
                             "and the pixel agreement")
    parser.add_argument("--out", metavar="JSON", help="write the full report (per-class IoU/Acc) to this file")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (quick checks)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resize_from_args(args) -> dict:
    """The ``preprocess`` resize arguments the eval options select (see ``add_eval_arguments``)."""
    if getattr(args, "max_long_side", None) is not None and getattr(args, "short_side", None) is None:
        raise ValueError("--max-long-side needs --short-side")
    if getattr(args, "size", None):
        return {"size": tuple(args.size)}
    if getattr(args, "short_side", None) is not None:
        return {"short_side": args.short_side,
                "max_long_side": args.max_long_side if args.max_long_side is not None else 2048}
    return default_resize(args.format)


def _percent(value: float) -> str:
    return "   n/a" if value is None or not math.isfinite(value) else f"{100 * value:6.2f}"


def format_summary(result: dict, top: int = 5) -> str:
    """A short text table: mIoU, aAcc, mAcc, the best and worst classes, and the comparison when present."""
    lines = [
        f"images: {result['counts']['images']}  valid pixels: {result['counts']['valid_pixels']}  "
        f"classes present: {result['counts']['classes_present']}/{result['dataset']['num_classes']}",
        f"mIoU  {_percent(result['mIoU'])} %",
        f"aAcc  {_percent(result['aAcc'])} %",
        f"mAcc  {_percent(result['mAcc'])} %",
    ]
    scored = [c for c in result["per_class"] if c["IoU"] is not None and math.isfinite(c["IoU"])]
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


def run_eval(args) -> int:
    """``segformer-fast eval``: evaluate a checkpoint on a dataset, print a summary, optionally write the report."""
    import torch

    from .checkpoints import load

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    resize = resize_from_args(args)
    mode_options = {}
    if args.mode == "slide":
        window = default_window(args.format)
        mode_options = {"crop": tuple(args.crop) if args.crop else window["crop"],
                        "stride": tuple(args.stride) if args.stride else window["stride"]}
    elif args.crop or args.stride:
        raise ValueError("--crop and --stride apply to --mode slide only")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    dataset = open_dataset(args.format, args.data, args.limit)
    model = load(args.model).to(device=device).eval()
    num_classes = model.config.num_labels
    if num_classes != dataset.num_classes:
        raise ValueError(
            f"{args.model} predicts {num_classes} classes but {args.format} has {dataset.num_classes}; "
            "use a checkpoint trained on this dataset"
        )
    # The engine is built first: the reference predictor casts the model to dtype in place.
    predict = make_predictor(model, args.engine, args.mode, resize=resize, device=device, dtype=dtype,
                             **mode_options)
    reference = None
    if args.compare:
        reference = make_predictor(model, args.compare, args.mode, resize=resize, device=device, dtype=dtype,
                                   **mode_options)
    result = evaluate(predict, dataset, num_classes, progress=not args.quiet, reference=reference)
    if "comparison" in result:
        result["comparison"]["against"] = args.compare
    result["settings"] = {
        "model": str(args.model),
        "engine": args.engine,
        "mode": args.mode,
        **{k: list(v) for k, v in mode_options.items()},
        "resize": {k: list(v) if isinstance(v, tuple) else v for k, v in resize.items()},
        "device": str(device),
        "dtype": args.dtype,
        "limit": args.limit,
        "compare": args.compare,
    }
    window = f" (crop {mode_options['crop']}, stride {mode_options['stride']})" if mode_options else ""
    print(f"{args.format} {args.data}: {args.engine} engine, {args.mode} mode{window}, {args.dtype} on {device}")
    print(format_summary(result))
    if args.out:
        write_report(result, args.out)
        print(f"report written to {args.out}")
    return 0
