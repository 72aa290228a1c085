"""Label maps as files (segformer_fast.render.images): the label PNG keeps the class ids (a palette PNG up to 256
classes, 16-bit above), the overlay file holds the palettes' overlay, and the overlay equals the float64 blend."""

import numpy as np
import pytest
from PIL import Image

from segformer_fast.render.images import save_label_png, save_overlay_png
from segformer_fast.render.palettes import overlay, palette_for


@pytest.mark.parametrize("num_classes, mode", [(150, "P"), (300, "I;16")])
def test_label_png_round_trips_class_ids(tmp_path, num_classes, mode):
    labels = np.random.default_rng(3).integers(0, num_classes, (17, 23))
    palette = palette_for(num_classes)
    path = tmp_path / "labels.png"
    save_label_png(labels, palette, path)
    with Image.open(path) as image:
        assert image.mode == mode
        np.testing.assert_array_equal(np.asarray(image).astype(np.int64), labels)
        if mode == "P":
            stored = np.array(image.getpalette()[: 3 * num_classes], dtype=np.uint8).reshape(num_classes, 3)
            np.testing.assert_array_equal(stored, palette.astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.png"]  # no temporary left behind


def test_overlay_png_matches_palettes_overlay(tmp_path):
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    labels = np.random.default_rng(5).integers(0, 150, (9, 11))
    palette = palette_for(150)
    save_overlay_png(image, labels, palette, tmp_path / "o.png", alpha=0.3)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png").convert("RGB")),
                                  np.asarray(overlay(image, labels, palette, alpha=0.3)))


def test_overlay_equals_the_float64_blend():
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    labels = rng.integers(0, 19, (37, 53))
    palette = palette_for(19)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        expected = np.clip(np.rint((1 - alpha) * np.asarray(image, dtype=np.float64)
                                   + alpha * palette[labels].astype(np.float64)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(overlay(image, labels, palette, alpha=alpha)), expected)
