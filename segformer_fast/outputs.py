"""Where segmentation outputs go and how label maps are written: the output tree mirrors the input folders.

An input found inside a folder given on the command line keeps its path relative to that folder; an input named
directly keeps only its file name. ``<stem>_labels.png`` holds the class ids, ``<stem>_overlay.png`` the colored
overlay. ``segment``, the Ray job and the torchrun job all name and write their outputs here, so their trees match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_path


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


def label_paths(out_dir: Path, image_path: Path, roots: list) -> tuple:
    """(labels PNG path, overlay PNG path) of an input under ``out_dir``."""
    stem = out_dir / output_stem(image_path, roots)
    return stem.with_name(stem.name + "_labels.png"), stem.with_name(stem.name + "_overlay.png")


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
