"""Output naming, label / overlay PNGs and the per-image segment loop of segformer_fast.outputs."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer_fast.core.fileio import load_image
from segformer_fast.outputs import (
    describe_error,
    label_paths,
    output_stem,
    outputs_exist,
    save_label_png,
    save_overlay_png,
    segment_files,
)
from segformer_fast.palettes import overlay, palette_for


def _write_rgb(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_names_mirror_the_input_folders(tmp_path):
    root = tmp_path / "in"
    nested = root / "city" / "street.v2.png"
    single = tmp_path / "elsewhere" / "photo.jpg"
    _write_rgb(nested, 4, 4, 0)
    _write_rgb(single, 4, 4, 1)
    roots = [root, single]
    assert output_stem(nested, roots) == Path("city/street.v2")
    assert output_stem(single, roots) == Path("photo")  # a file given directly: its name only
    out = tmp_path / "out"
    assert label_paths(out, nested, roots) == (out / "city" / "street.v2_labels.png",
                                               out / "city" / "street.v2_overlay.png")
    assert label_paths(out, single, roots) == (out / "photo_labels.png", out / "photo_overlay.png")


def test_outputs_exist_needs_both_files(tmp_path):
    image = tmp_path / "in" / "a.png"
    _write_rgb(image, 4, 4, 0)
    out = tmp_path / "out"
    labels_path, overlay_path = label_paths(out, image, [image.parent])
    assert not outputs_exist(out, image, [image.parent])
    out.mkdir()
    labels_path.write_bytes(b"x")
    assert not outputs_exist(out, image, [image.parent])
    overlay_path.write_bytes(b"x")
    assert outputs_exist(out, image, [image.parent])


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
    _write_rgb(tmp_path / "a.png", 9, 11, 4)
    image = load_image(tmp_path / "a.png")
    labels = np.random.default_rng(5).integers(0, 150, (9, 11))
    palette = palette_for(150)
    save_overlay_png(image, labels, palette, tmp_path / "o.png", alpha=0.3)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png").convert("RGB")),
                                  np.asarray(overlay(image, labels, palette, alpha=0.3)))


def test_describe_error_is_one_line():
    assert describe_error(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    assert describe_error(RuntimeError("")) == "RuntimeError"
    assert describe_error(OSError("   ")) == "OSError"


def test_segment_files_writes_outputs_and_reports_failures(tmp_path, capsys):
    root = tmp_path / "in"
    _write_rgb(root / "a.png", 6, 8, 0)
    _write_rgb(root / "sub" / "b.png", 5, 7, 1)
    _write_rgb(root / "boom.png", 4, 4, 2)
    (root / "broken.png").write_bytes(b"not a png")
    palette = palette_for(150)

    def predict(image):
        if image.size == (4, 4):
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB\ndetails")
        return np.asarray(image)[:, :, 0].astype(np.int64) % 150  # labels that depend on the pixels

    paths = [root / "a.png", root / "boom.png", root / "broken.png", root / "sub" / "b.png"]
    failures = segment_files(paths, predict, palette, tmp_path / "out", [root], alpha=0.5, progress=False)
    err = capsys.readouterr().err
    assert failures == [f"{root / 'boom.png'}: RuntimeError: CUDA out of memory. Tried to allocate 1 GiB",
                        failures[1]]
    assert failures[1].startswith(f"{root / 'broken.png'}: ")
    assert "failed" in err and "boom.png" in err and "cannot read" in err and "broken.png" in err
    for relative in ("a", "sub/b"):
        image = load_image(root / f"{relative}.png")
        expected = predict(image)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{relative}_labels.png")), expected)
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "out" / f"{relative}_overlay.png").convert("RGB")),
            np.asarray(overlay(image, expected, palette, alpha=0.5)))
    assert not (tmp_path / "out" / "boom_labels.png").exists() and not (tmp_path / "out" / "broken_labels.png").exists()
    assert not list((tmp_path / "out").rglob(".*")), "temporary files left behind"


def test_output_stems_refuse_inputs_that_share_outputs(tmp_path):
    from segformer_fast.outputs import output_stems

    day, night = tmp_path / "day", tmp_path / "night"
    for path in (day / "a.jpg", day / "a.png", day / "b.png", night / "b.png", night / "c.png"):
        _write_rgb(path, 4, 4, 0)
    assert output_stems([day / "b.png", night / "c.png"], [day, night]) == [Path("b"), Path("c")]
    assert output_stems([day / "b.png", night / "b.png"], [tmp_path]) == [Path("day/b"), Path("night/b")]
    with pytest.raises(ValueError) as info:
        output_stems([day / "a.jpg", day / "a.png", day / "b.png", night / "b.png"], [day, night])
    message = str(info.value)
    assert message.startswith("2 output names would be written by several inputs")
    for path in (day / "a.jpg", day / "a.png", day / "b.png", night / "b.png"):
        assert str(path) in message
