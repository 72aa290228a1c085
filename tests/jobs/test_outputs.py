"""Output naming, the output kinds, the files written per image and the one-line errors of
segformer_fast.jobs.outputs; skip_existing's rule for outputs already there."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer_fast.core.fileio import load_image
from segformer_fast.jobs.outputs import describe_error, output_paths, output_stem, parse_outputs, write_outputs
from segformer_fast.jobs.segment import plan_segment
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.render.palettes import overlay, palette_for


def _write_rgb(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def outputs_exist(out_dir: Path, image_path: Path, roots: list, outputs=("labels", "overlay")) -> bool:
    """Whether every one of the ``outputs`` of an input image is a file in ``out_dir``."""
    return all(path.is_file() for path in output_paths(out_dir, image_path, roots, outputs).values())


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
    assert output_paths(out, nested, roots) == {"labels": out / "city" / "street.v2_labels.png",
                                                "overlay": out / "city" / "street.v2_overlay.png"}
    assert output_paths(out, single, roots) == {"labels": out / "photo_labels.png",
                                                "overlay": out / "photo_overlay.png"}


def test_skip_existing_needs_every_output(tmp_path):
    """plan_segment(skip_existing=True) leaves an image out only once every one of its outputs is a file."""
    image = tmp_path / "in" / "a.png"
    _write_rgb(image, 4, 4, 0)
    out = tmp_path / "out"
    settings = SegmentSettings(model="unused", overlay=True)
    labels_path, overlay_path = output_paths(out, image, [image.parent]).values()

    def todo() -> int:
        return len(plan_segment([image.parent], out, settings, skip_existing=True).todo)

    assert todo() == 1
    out.mkdir()
    labels_path.write_bytes(b"x")
    assert todo() == 1
    overlay_path.write_bytes(b"x")
    assert todo() == 0


def test_describe_error_is_one_line():
    # an image's own failures (unreadable, unwritable) in their words; anything else after its type's name
    assert describe_error(ValueError("bad value\nsecond line")) == "bad value"
    assert describe_error(PermissionError("permission denied: out/a.png")) == "permission denied: out/a.png"
    assert describe_error(RuntimeError("out of memory\nmore")) == "RuntimeError: out of memory"
    assert describe_error(RuntimeError("")) == "RuntimeError"
    assert describe_error(OSError("   ")) == "OSError"


def test_describe_error_does_not_repeat_the_path():
    path = Path("/photos/a.png")
    error = ValueError(f"cannot read image {path}: truncated file")
    assert describe_error(error, path) == "cannot read image: truncated file"
    assert describe_error(error) == f"cannot read image {path}: truncated file"


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
