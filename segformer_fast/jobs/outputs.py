"""Where ``segment`` writes its results: output names that mirror the input folders, and the files of each image.

Each input image ``<root>/<relative>/<name>.<ext>`` found under one of the input ``roots`` gives
``<out_dir>/<relative>/<name>_labels.png`` (class ids) and ``<name>_overlay.png`` (the labels' colors over the
image; ``<name>_overlay.jpg`` for the cheaper "overlay-jpg"); an input given as a file (not under a root folder)
gives ``<out_dir>/<name>_labels.png``. Which of them are written is the job's ``outputs`` (``OUTPUT_KINDS``).
Every file is written to a temporary name and renamed (``render.images``), so an interrupted run never leaves a
partial file under the final name.

Two inputs that would get the same outputs (``a.jpg`` and ``a.png`` in one folder, ``x.png`` in two input folders)
are refused before any work by :func:`output_stems`, naming them: the names stay predictable (they never depend on
which other files a run was given, so a resume finds the same outputs on every run), and no result is ever lost to
another. Every executor plans its outputs with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segformer_fast.render.images import save_label_png, save_overlay_png

#: What ``segment`` can write per image: the label PNG, the overlay as PNG (lossless), or as JPEG (several times
#: cheaper to encode at 12 MP, lossy).
OUTPUT_KINDS = ("labels", "overlay", "overlay-jpg")
DEFAULT_OUTPUTS = ("labels", "overlay")
_SUFFIXES = {"labels": "_labels.png", "overlay": "_overlay.png", "overlay-jpg": "_overlay.jpg"}


def parse_outputs(text) -> tuple:
    """``"labels,overlay"`` (or a sequence) -> the kinds in ``OUTPUT_KINDS`` order; ValueError for unknown ones."""
    kinds = [kind.strip() for kind in (text.split(",") if isinstance(text, str) else text) if kind.strip()]
    unknown = [kind for kind in kinds if kind not in OUTPUT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"--outputs takes a comma-separated list of {', '.join(OUTPUT_KINDS)}; got {text!r}")
    if "overlay" in kinds and "overlay-jpg" in kinds:
        raise ValueError("--outputs: choose overlay (PNG) or overlay-jpg (JPEG), not both")
    return tuple(kind for kind in OUTPUT_KINDS if kind in kinds)


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


def output_paths(out_dir: Path, image_path: Path, roots: list, outputs=DEFAULT_OUTPUTS) -> dict:
    """{kind: path} of the ``outputs`` of an input image under ``out_dir`` (see :func:`output_stem`)."""
    stem = Path(out_dir) / output_stem(Path(image_path), roots)
    return {kind: stem.with_name(stem.name + _SUFFIXES[kind]) for kind in outputs}


def write_outputs(image: Image.Image, labels: np.ndarray, palette: np.ndarray, paths: dict, alpha: float) -> None:
    """Write the outputs ``paths`` ({kind: path}, from :func:`output_paths`) of one segmented image."""
    for kind, path in paths.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if kind == "labels":
            save_label_png(labels, palette, path)
        else:
            save_overlay_png(image, labels, palette, path, alpha)


def describe_error(err: BaseException, path=None) -> str:
    """The first line of the message, for one-line reports: as it is for the failures an image can meet (ValueError,
    OSError: unreadable, unwritable), after the type name for anything else (``RuntimeError: ...``, a bug or out of
    memory), the type name alone for an empty message; with ``path``, the path is dropped from the message where it
    is repeated there (the report names it)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if path is not None and str(path) in text:  # "cannot read image /x/a.png: ..." -> "cannot read image: ..."
        text = text.replace(f" {path}", "").replace(str(path), "the file")
    if text and isinstance(err, (ValueError, OSError)):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
