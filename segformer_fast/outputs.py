"""Where ``segment`` writes its results and how: output names that mirror the input folders, label PNGs, overlays,
and the per-image loop that segments a list of files into an output folder and carries on past bad images.

Each input image ``<root>/<relative>/<name>.<ext>`` found under one of the input ``roots`` gives
``<out_dir>/<relative>/<name>_labels.png`` (class ids) and ``<name>_overlay.png`` (the labels' colors over the
image); an input given as a file (not under a root folder) gives ``<out_dir>/<name>_labels.png``. Every file is
written to a temporary name and renamed, so an interrupted run never leaves a partial PNG under the final name.

Two inputs that would get the same outputs (``a.jpg`` and ``a.png`` in one folder, ``x.png`` in two input folders)
are refused before any work by :func:`output_stems`, naming them: the names stay predictable (they never depend on
which other files a run was given, so ``--skip-existing`` finds the same outputs on every run), and no result is
ever lost to another. Every way of running ``segment`` (one process or many) plans its outputs with it.
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


def output_stems(image_paths: Sequence[Path], roots: list) -> list[Path]:
    """:func:`output_stem` of every input, in order; ValueError naming the inputs when two or more would write the
    same output files (the run must refuse before it starts rather than let one result overwrite another)."""
    stems = [output_stem(Path(path), roots) for path in image_paths]
    sources: dict[Path, list] = {}
    for path, stem in zip(image_paths, stems):
        sources.setdefault(stem, []).append(path)
    shared = {stem: paths for stem, paths in sources.items() if len(paths) > 1}
    if shared:
        examples = [f"{stem}_labels.png from " + " and ".join(str(p) for p in paths)
                    for stem, paths in list(shared.items())[:5]]
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise ValueError(
            f"{len(shared)} output name{'s' if len(shared) > 1 else ''} would be written by several inputs, and one "
            f"result would overwrite the other: {'; '.join(examples)}{more}. Rename the inputs, or segment them into "
            "separate output folders"
        )
    return stems


def label_paths(out_dir: Path, image_path: Path, roots: list) -> tuple[Path, Path]:
    """(labels PNG, overlay PNG) paths for an input image under ``out_dir`` (see :func:`output_stem`)."""
    stem = out_dir / output_stem(image_path, roots)
    return stem.with_name(stem.name + "_labels.png"), stem.with_name(stem.name + "_overlay.png")


def outputs_exist(out_dir: Path, image_path: Path, roots: list) -> bool:
    """True when both the labels PNG and the overlay PNG of an input image are already in ``out_dir``."""
    return all(path.is_file() for path in label_paths(out_dir, image_path, roots))


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A label map as the image ``save_label_png`` writes: palette mode (pixel values are class ids, shown in the
    palette's colors) for up to 256 classes, 16-bit grayscale class ids above that."""
    if len(palette) <= 256:
        image = Image.fromarray(labels.astype(np.uint8), "P")
        image.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
        return image
    return Image.fromarray(labels.astype(np.uint16))


def save_label_png(labels: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """Write a label map atomically: a palette PNG (pixel values are class ids, shown in the palette's colors) for
    up to 256 classes, a 16-bit grayscale PNG of class ids above that (:func:`label_image`)."""
    image = label_image(labels, palette)
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


class _WindowProgress:
    """``progress(done, total)`` for one image's sliding windows: a second progress bar, opened at the first report
    (a whole-image run reports nothing and shows none), redrawn at every report (a window takes long enough)."""

    def __init__(self, name: str):
        self.name = name
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.name, unit="window", leave=False, position=1, mininterval=0)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def segment_files(
    image_paths: Sequence[Path],
    predict: Callable[..., np.ndarray],
    palette: np.ndarray,
    out_dir: Path,
    roots: list,
    *,
    alpha: float = 0.5,
    progress: bool = True,
    report_windows: bool = False,
) -> list[str]:
    """Segment each image file with ``predict`` (image -> (H, W) labels) and write its labels and overlay PNGs.

    One bad image (unreadable, out of memory, unwritable output, ...) is reported on stderr and skipped; the loop
    goes on. Warnings raised while segmenting an image are printed with its path. With ``report_windows`` and
    ``progress``, ``predict`` is called with the ``progress=`` and ``on_auto_choice=`` keywords of
    :func:`segformer_fast.predictors.make_predictor`'s predictors: a bar per image counts its sliding windows, and
    the mode and size that ``mode="auto"`` chose is printed per image. Returns one ``"<path>: <error>"`` line per
    image that failed (empty when every image was written).
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
                if progress and report_windows:
                    labels = _predict_with_reports(predict, image, image_path)
                else:
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


def _predict_with_reports(predict: Callable[..., np.ndarray], image: Image.Image, image_path: Path) -> np.ndarray:
    """``predict(image)`` with a sliding-window progress bar and a stderr line for the mode "auto" chose."""

    def say_choice(mode: str, size: tuple[int, int]) -> None:
        how = "whole image" if mode == "whole" else "sliding windows"
        tqdm.write(f"{image_path}: mode auto chose {how} at {size[0]}x{size[1]}", file=sys.stderr)

    windows = _WindowProgress(image_path.name)
    try:
        return predict(image, progress=windows, on_auto_choice=say_choice)
    finally:
        windows.close()
