"""Output naming, the output kinds, label / overlay files and the writability check of segformer_fast.jobs.outputs."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer_fast.core.fileio import check_can_create, load_image
from segformer_fast.jobs.outputs import (
    describe_error,
    label_paths,
    output_paths,
    output_stem,
    outputs_exist,
    parse_outputs,
    save_label_png,
    save_overlay_png,
    write_outputs,
)
from segformer_fast.jobs.palettes import overlay, palette_for


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


def test_describe_error_does_not_repeat_the_path():
    path = Path("/photos/a.png")
    error = ValueError(f"cannot read image {path}: truncated file")
    assert describe_error(error, path) == "ValueError: cannot read image: truncated file"
    assert describe_error(error) == f"ValueError: cannot read image {path}: truncated file"


def test_write_outputs_writes_the_chosen_kinds(tmp_path):
    root = tmp_path / "in"
    _write_rgb(root / "sub" / "b.png", 5, 7, 1)
    image = load_image(root / "sub" / "b.png")
    labels = np.asarray(image)[:, :, 0].astype(np.int64) % 150
    palette = palette_for(150)
    for outputs, names in ((("labels",), ["b_labels.png"]), (("overlay-jpg",), ["b_overlay.jpg"]),
                           (("labels", "overlay"), ["b_labels.png", "b_overlay.png"])):
        out = tmp_path / "-".join(outputs)
        paths = output_paths(out, root / "sub" / "b.png", [root], outputs)
        write_outputs(image, labels, palette, paths, alpha=0.5)
        assert sorted(p.name for p in out.rglob("*") if p.is_file()) == names
        assert outputs_exist(out, root / "sub" / "b.png", [root], outputs)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels" / "sub" / "b_labels.png")), labels)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels-overlay" / "sub" / "b_overlay.png")),
                                  np.asarray(overlay(image, labels, palette, alpha=0.5)))
    assert Image.open(tmp_path / "overlay-jpg" / "sub" / "b_overlay.jpg").format == "JPEG"


def test_parse_outputs():
    assert parse_outputs("overlay,labels") == ("labels", "overlay")
    assert parse_outputs("labels") == ("labels",)
    for bad in ("", "labels,mask", "overlay,overlay-jpg"):
        with pytest.raises(ValueError, match="--outputs"):
            parse_outputs(bad)


def test_overlay_equals_the_float64_blend():
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    labels = rng.integers(0, 19, (37, 53))
    palette = palette_for(19)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        expected = np.clip(np.rint((1 - alpha) * np.asarray(image, dtype=np.float64)
                                   + alpha * palette[labels].astype(np.float64)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(overlay(image, labels, palette, alpha=alpha)), expected)


def test_check_can_create_refuses_a_read_only_folder(tmp_path):
    import os

    folder = tmp_path / "locked"
    folder.mkdir()
    check_can_create(folder / "new" / "deeper", "--out folder")  # a missing folder is checked where it will be made
    os.chmod(folder, 0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(ValueError, match="cannot write --out folder"):
            check_can_create(folder, "--out folder")
        with pytest.raises(ValueError, match="cannot write"):
            check_can_create(folder / "new", "--out folder")
    finally:
        os.chmod(folder, 0o700)
    assert not list(folder.iterdir()), "the probe file was left behind"


def test_output_stems_refuse_inputs_that_share_outputs(tmp_path):
    from segformer_fast.jobs.outputs import output_stems

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
