"""Palettes and the overlay (segformer_fast.render.palettes): dataset palettes and class names, generated palettes,
the colors and blend of every pixel, and the errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast.render.palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    class_names,
    generated_palette,
    overlay,
    palette_for,
)


def _random_image(rng, height, width):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_palettes_lengths_and_distinct_colors():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert len(set(ADE20K_CLASSES)) == 150 and len(set(CITYSCAPES_CLASSES)) == 19
    assert len(set(CITYSCAPES_PALETTE)) == 19
    # The published ADE20K palette repeats one color: road (6) and skyscraper (48) are both (140, 140, 140).
    duplicated = {c for c in ADE20K_PALETTE if ADE20K_PALETTE.count(c) > 1}
    assert duplicated == {(140, 140, 140)}
    assert [i for i, c in enumerate(ADE20K_PALETTE) if c == (140, 140, 140)] == [6, 48]
    assert len(set(ADE20K_PALETTE)) == 149
    for palette in (ADE20K_PALETTE, CITYSCAPES_PALETTE):
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_PALETTE[0] == (120, 120, 120)
    assert CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_PALETTE[13] == (0, 0, 142)


def test_palette_for():
    assert palette_for(150).tolist() == [list(c) for c in ADE20K_PALETTE]
    assert palette_for(19).tolist() == [list(c) for c in CITYSCAPES_PALETTE]
    for n in (1, 2, 21, 1000):
        palette = palette_for(n)
        assert palette.shape == (n, 3) and palette.dtype == np.uint8
        assert len({tuple(c) for c in palette.tolist()}) == n
        assert np.array_equal(palette, palette_for(n))
    # PASCAL VOC colors: 1 -> (128, 0, 0), 2 -> (0, 128, 0), 15 (person) -> (192, 128, 128).
    assert generated_palette(21)[[1, 2, 15]].tolist() == [[128, 0, 0], [0, 128, 0], [192, 128, 128]]


def colorize(labels, palette) -> Image.Image:
    """The labels' palette colors alone: the overlay with weight 1 on the colors, over a black image."""
    return overlay(Image.new("RGB", (labels.shape[-1], labels.shape[-2])), labels, palette, alpha=1.0)


def test_colorize_and_overlay_values():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 19, size=(13, 17))
    labels[4, 5] = 13
    image = colorize(labels, CITYSCAPES_PALETTE)
    assert image.mode == "RGB" and image.size == (17, 13)
    pixels = np.asarray(image)
    assert tuple(pixels[4, 5]) == (0, 0, 142)
    assert np.array_equal(pixels, np.array(CITYSCAPES_PALETTE, dtype=np.uint8)[labels])
    assert np.array_equal(np.asarray(colorize(torch.from_numpy(labels), palette_for(19))), pixels)

    photo = _random_image(rng, 13, 17)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        blended = np.asarray(overlay(Image.fromarray(photo), labels, CITYSCAPES_PALETTE, alpha=alpha))
        expected = np.rint((1 - alpha) * photo.astype(np.float64) + alpha * pixels.astype(np.float64))
        assert np.array_equal(blended, expected.astype(np.uint8))
    assert np.array_equal(np.asarray(overlay(Image.fromarray(photo), labels, CITYSCAPES_PALETTE, 0.0)), photo)


def test_visualization_errors():
    labels = np.zeros((4, 6), dtype=np.int64)
    with pytest.raises(ValueError, match=r"image is 5x6 \(H x W\), labels are 4x6"):
        overlay(Image.new("RGB", (6, 5)), labels, CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        overlay(Image.new("RGB", (6, 4)), labels, CITYSCAPES_PALETTE, alpha=1.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 18\].*got values in \[0, 255\]"):
        labels[0, 0] = 255
        colorize(labels, CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match=r"2-D \(H, W\) label map, got shape \(1, 4, 6\)"):
        colorize(np.zeros((1, 4, 6), dtype=np.int64), CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match=r"labels must be integers"):
        colorize(np.zeros((4, 6), dtype=np.float32), CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match=r"palette must have shape \(K, 3\)"):
        colorize(np.zeros((4, 6), dtype=np.int64), [(1, 2)])
    with pytest.raises(ValueError, match=r"num_labels must be a positive integer"):
        palette_for(0)


def test_class_names_are_the_checkpoint_s_unless_a_dataset_is_asked_for():
    # a 150-class checkpoint with generic names keeps them: ADE20K's only when asked
    assert class_names({i: f"LABEL_{i}" for i in range(150)}, 150) == [f"LABEL_{i}" for i in range(150)]
    assert class_names({}, 3) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert class_names({0: "sky", 2: "road"}, 3) == ["sky", "LABEL_1", "road"]
    assert class_names({0: "x"}, 150, "ade20k") == list(ADE20K_CLASSES)
    assert class_names({}, 19, "cityscapes") == list(CITYSCAPES_CLASSES)
    with pytest.raises(ValueError, match="ade20k has 150 classes but the checkpoint predicts 19"):
        class_names({}, 19, "ade20k")
    with pytest.raises(ValueError, match="choose one of ade20k, cityscapes"):
        class_names({}, 19, "coco")
