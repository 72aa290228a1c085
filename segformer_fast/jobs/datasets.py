"""ADE20K and Cityscapes validation folders as image / annotation pairs, and their test-time resize and windows.

Formats (``open_dataset``):

- ``ade20k``: ``DIR/images/validation/*.jpg`` with ``DIR/annotations/validation/*.png`` (ADEChallengeData2016), or
  ``DIR/images/*.jpg`` with ``DIR/annotations/*.png``. Labels 0..150 with 0 = "other", reduced to 150 classes with
  ``reduce_zero_label``.
- ``cityscapes``: ``DIR/leftImg8bit/val/<city>/*_leftImg8bit.png`` with ``DIR/gtFine/val/<city>/*_gtFine_labelIds.png``
  (mapped to the 19 trainIds with the official cityscapesScripts table; every other id -> 255), or, when no labelIds
  file is there, a ready ``*_gtFine_labelTrainIds.png``.

Default resizing (``default_resize``): ADE20K uses mmseg's test pipeline, keep ratio with short side 512 and long side
at most 2048 (``img_scale=(2048, 512)``); Cityscapes keep ratio with short side 1024 and long side at most 2048
(``img_scale=(2048, 1024)``), which leaves the native 1024x2048 Cityscapes images as they are (whole-image inference
at full resolution; the published SegFormer Cityscapes numbers use sliding-window inference with
``default_window``'s crop and stride).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segformer_fast.core.fileio import load_image
from segformer_fast.jobs.metrics import cityscapes_label_table, reduce_zero_label
from segformer_fast.render.palettes import ADE20K_CLASSES, CITYSCAPES_CLASSES

FORMATS = ("ade20k", "cityscapes")


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
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"no ADE20K layout in {root}: expected {root / 'images' / split} with "
                                f"{root / 'annotations' / split} (the dataset's own layout), or {root / 'images'} with "
                                f"{root / 'annotations'}")
    images_dir = root / "images"
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
