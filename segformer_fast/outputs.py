"""Where ``segment`` writes its results and how: output names that mirror the input folders, label PNGs, overlays,
and the per-image loop that segments a list of files into an output folder and carries on past bad images.

Each input image ``<root>/<relative>/<name>.<ext>`` found under one of the input ``roots`` gives
``<out_dir>/<relative>/<name>_labels.png`` (class ids) and ``<name>_overlay.png`` (the labels' colors over the
image); an input given as a file (not under a root folder) gives ``<out_dir>/<name>_labels.png``. Every file is
written to a temporary name and renamed, so an interrupted run never leaves a partial PNG under the final name.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .fileio import atomic_path, load_image
from .palettes import overlay


def output_stem(image_path: Path, roots: list) -> Path:
    """Output path (without suffix) for an input: its path relative to the folder it was found in, else its name."""
    resolved = image_path.resolve()
    for root in roots:
        if root.is_dir():
            try:
                return resolved.relative_to(root.resolve()).with_suffix("")
            except ValueError:
                continue
    return Path(image_path.stem)


def label_paths(out_dir: Path, image_path: Path, roots: list) -> tuple[Path, Path]:
    """(labels PNG, overlay PNG) paths for an input image under ``out_dir`` (see :func:`output_stem`)."""
    stem = out_dir / output_stem(image_path, roots)
    return stem.with_name(stem.name + "_labels.png"), stem.with_name(stem.name + "_overlay.png")


def outputs_exist(out_dir: Path, image_path: Path, roots: list) -> bool:
    """True when both the labels PNG and the overlay PNG of an input image are already in ``out_dir``."""
    return all(path.is_file() for path in label_paths(out_dir, image_path, roots))


def save_label_png(labels: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """Write a label map atomically: a palette PNG (pixel values are class ids, shown in the palette's colors) for
    up to 256 classes, a 16-bit grayscale PNG of class ids above that."""
    if len(palette) <= 256:
        image = Image.fromarray(labels.astype(np.uint8), "P")
        image.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def save_overlay_png(image: Image.Image, labels: np.ndarray, palette: np.ndarray, path: Path,
                     alpha: float = 0.5) -> None:
    """Write the labels' palette colors blended over ``image`` (weight ``alpha`` for the colors) atomically as PNG."""
    with atomic_path(path) as temporary:
        overlay(image, labels, palette, alpha=alpha).save(temporary, format="PNG")


def describe_error(err: BaseException) -> str:
    """``TypeName: first line of the message`` (just the type name for an empty message), for one-line reports."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def segment_files(
    image_paths: Sequence[Path],
    predict: Callable[[Image.Image], np.ndarray],
    palette: np.ndarray,
    out_dir: Path,
    roots: list,
    *,
    alpha: float = 0.5,
    progress: bool = True,
) -> list[str]:
    """Segment each image file with ``predict`` (image -> (H, W) labels) and write its labels and overlay PNGs.

    One bad image (unreadable, out of memory, unwritable output, ...) is reported on stderr and skipped; the loop
    goes on. Warnings raised while segmenting an image are printed with its path. Returns one ``"<path>: <error>"``
    line per image that failed (empty when every image was written).
    """
    failures = []
    for image_path in tqdm(image_paths, desc="segment", unit="img", disable=not progress):
        try:
            image = load_image(image_path)
        except (ValueError, OSError) as err:
            failures.append(f"{image_path}: {err}")
            tqdm.write(f"cannot read {image_path}: {err}", file=sys.stderr)
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                labels = predict(image)
            for warning in caught:
                tqdm.write(f"{image_path}: {warning.message}", file=sys.stderr)
            labels_path, overlay_path = label_paths(out_dir, image_path, roots)
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            save_label_png(labels, palette, labels_path)
            save_overlay_png(image, labels, palette, overlay_path, alpha)
        except Exception as err:  # one bad image (out of memory, unwritable output, ...) must not stop the run
            failures.append(f"{image_path}: {describe_error(err)}")
            tqdm.write(f"failed {image_path}: {describe_error(err)}", file=sys.stderr)
            torch.cuda.empty_cache()  # a no-op unless CUDA is in use; frees what the failed image left cached
    return failures
