"""Color palettes and class names of the SegFormer datasets, and label maps drawn over images (``overlay``).

The ADE20K (150 classes) and Cityscapes (19 trainId classes) names and palettes are the ones published with mmseg's
``ADE20KDataset`` and ``CityscapesDataset`` (the colors SegFormer's own visualizations use). Any other number of
labels gets a deterministic generated palette (the PASCAL VOC bit-interleaving color map), distinct for every label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from segformer_fast.core.fileio import to_rgb

#: ADE20K (SceneParsing, 150 classes) class names, in label order (mmseg ``ADE20KDataset``; "bed " stripped).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

#: ADE20K palette, RGB, in label order, as published with mmseg ``ADE20KDataset``. Labels 6 (road) and 48
#: (skyscraper) share (140, 140, 140) there; it is kept as published.
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41),
    (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255),
    (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255),
    (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245),
    (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255),
    (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0),
    (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255),
    (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0),
    (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255),
    (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255),
    (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255),
    (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

#: Cityscapes class names of the 19 evaluated trainIds, in trainId order (mmseg ``CityscapesDataset``).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

#: Cityscapes palette, RGB, in trainId order (the official cityscapesScripts colors, as mmseg publishes them).
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


#: The datasets whose class names a command shows when asked (``--class-names``).
DATASET_CLASS_NAMES = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES}


def class_names(id2label: dict, num_labels: int, dataset: str | None = None) -> list[str]:
    """A name per class, the one place every command and the service take names from: the checkpoint's own
    (``id2label``; ``LABEL_i``, transformers' default, for a class it does not name), or, only when asked, those of
    ``dataset`` ("ade20k", "cityscapes"), which must have ``num_labels`` classes (ValueError otherwise)."""
    if dataset is None:
        return [str(id2label.get(index, f"LABEL_{index}")) for index in range(num_labels)]
    if dataset not in DATASET_CLASS_NAMES:
        raise ValueError(f"class names of {dataset!r} are unknown; choose one of {', '.join(DATASET_CLASS_NAMES)}")
    names = DATASET_CLASS_NAMES[dataset]
    if len(names) != num_labels:
        raise ValueError(f"{dataset} has {len(names)} classes but the checkpoint predicts {num_labels}: its names "
                         "would not fit")
    return list(names)


def generated_palette(num_labels: int) -> np.ndarray:
    """(num_labels, 3) uint8: the PASCAL VOC color map, distinct for every label (label 0 is black).

    Label i's bits are dealt out in turn to R, G and B, most significant bit first: bits 0, 3, 6, ... of i go to
    R's bits 7, 6, 5, ..., bits 1, 4, 7, ... to G and bits 2, 5, 8, ... to B, so up to 2**24 labels get distinct colors.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    if num_labels > 1 << 24:
        raise ValueError(f"at most {1 << 24} labels can get distinct 8-bit RGB colors, got {num_labels}")
    labels = np.arange(num_labels, dtype=np.int64)
    palette = np.zeros((num_labels, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((labels >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def palette_for(num_labels: int) -> np.ndarray:
    """(num_labels, 3) uint8 RGB palette: ADE20K's for 150 labels, Cityscapes' for 19, else ``generated_palette``."""
    if num_labels == len(ADE20K_PALETTE):
        return np.array(ADE20K_PALETTE, dtype=np.uint8)
    if num_labels == len(CITYSCAPES_PALETTE):
        return np.array(CITYSCAPES_PALETTE, dtype=np.uint8)
    return generated_palette(num_labels)


def _palette_array(palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] == 0:
        raise ValueError(f"palette must have shape (K, 3) with K >= 1, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise ValueError("palette colors must be integers in 0..255")
    return array.astype(np.uint8)


def _label_array(labels: np.ndarray | torch.Tensor, num_colors: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) label map, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_colors:
            raise ValueError(
                f"labels must lie in [0, {num_colors - 1}] for a palette of {num_colors} colors, "
                f"got values in [{low}, {high}]"
            )
    return labels.astype(np.intp, copy=False)


def overlay(
    image: Image.Image,
    labels: np.ndarray | torch.Tensor,
    palette: Sequence[Sequence[int]] | np.ndarray,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend the colorized labels over ``image``: round((1 - alpha) * image + alpha * color) per channel.

    ``image`` (converted to RGB) and ``labels`` must have the same size; ``alpha`` in [0, 1] is the weight of the
    label colors (0 gives the image, 1 the colorized labels).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = _palette_array(palette)
    label_array = _label_array(labels, len(colors))
    if label_array.shape != (image.height, image.width):
        raise ValueError(
            f"image and labels must have the same size: image is {image.height}x{image.width} (H x W), "
            f"labels are {label_array.shape[0]}x{label_array.shape[1]}"
        )
    # the blend of every (image value, color value) pair, computed once in float64 (65536 entries), then looked up
    # per pixel in bands of rows: the same values as blending in float64, without image-sized float64 arrays
    values = np.arange(256, dtype=np.float64)
    table = np.clip(np.rint((1.0 - alpha) * values[:, None] + alpha * values[None, :]), 0, 255).astype(np.uint8)
    table = table.reshape(-1)  # indexed by image value * 256 + color value
    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    blended = np.empty_like(pixels)
    rows = max(1, (1 << 20) // max(1, image.width))
    for top in range(0, image.height, rows):
        band = slice(top, top + rows)
        index = pixels[band].astype(np.uint16)
        index <<= 8
        index |= colors[label_array[band]]
        blended[band] = table.take(index)
    return Image.fromarray(blended, "RGB")
