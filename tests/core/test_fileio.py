"""Atomic writes, image loading and image discovery."""

import os

import numpy as np
import pytest
from PIL import Image

from segformer_fast.core.fileio import (
    IMAGE_EXTENSIONS,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_can_create,
    check_output_folder,
    find_images,
    load_image,
    remove_stale_temporaries,
    to_rgb,
)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_path_success_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        assert tmp.exists() and target.read_bytes() == b"old"  # nothing visible under the final name yet
        Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp)  # PIL picks PNG from the suffix
    assert _listing(tmp_path) == ["mask.png"]
    with Image.open(target) as image:
        assert image.format == "PNG" and image.size == (3, 2) and image.getpixel((0, 0)) == (1, 2, 3)


def test_atomic_path_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []

    target.write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == ["out.txt"] and target.read_text() == "previous"


def test_atomic_path_writer_that_removes_or_never_writes(tmp_path):
    # A block that never writes still produces the (empty) file; one whose temporary vanished raises.
    with atomic_path(tmp_path / "empty.bin"):
        pass
    assert (tmp_path / "empty.bin").read_bytes() == b""
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "gone.bin") as tmp:
            os.unlink(tmp)
    assert _listing(tmp_path) == ["empty.bin"]


def test_atomic_write_bytes_and_text(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01\x02")
    atomic_write_text(tmp_path / "b.json", '{"x": "é"}')
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01\x02"
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == '{"x": "é"}'
    assert _listing(tmp_path) == ["a.bin", "b.json"]
    mode = (tmp_path / "a.bin").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_atomic_path_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder .*nope does not exist"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "x")


# ---------------------------------------------------------------------------------------------------------------
# load_image


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_load_rgb_and_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    loaded = load_image(_save(Image.fromarray(rgb), tmp_path / "rgb.png"))
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), rgb)

    gray = rng.integers(0, 256, size=(9, 13), dtype=np.uint8)
    loaded = load_image(_save(Image.fromarray(gray, "L"), tmp_path / "gray.png"))
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.repeat(gray[:, :, None], 3, axis=2))

    gray_alpha = Image.fromarray(np.dstack([gray, 255 - gray]), "LA")
    loaded = load_image(_save(gray_alpha, tmp_path / "la.png"))
    assert np.array_equal(np.asarray(loaded), np.repeat(gray[:, :, None], 3, axis=2))


def test_load_rgba_drops_alpha_without_compositing(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent: the color is still kept
    loaded = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), rgba[:, :, :3])


def test_load_palette(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    expected = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)[indices]
    assert np.array_equal(np.asarray(load_image(_save(image, tmp_path / "p.png"))), expected)
    image.info["transparency"] = 1
    transparent = _save(image, tmp_path / "p_transparent.png", transparency=1)
    assert np.array_equal(np.asarray(load_image(transparent)), expected)


def test_load_16bit_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 128, 129, 1000], [32896, 40000, 65534, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # stored as a 16-bit grayscale PNG
    loaded = np.asarray(load_image(path))
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # round(v * 255 / 65535)
    assert expected.tolist() == [[0, 0, 1, 4], [128, 156, 255, 255]]
    assert np.array_equal(loaded, np.repeat(expected[:, :, None], 3, axis=2))
    # 32-bit integer images ("I") are read as 16-bit samples, out-of-range values clipped.
    wide = Image.fromarray(np.array([[-5, 257, 70000]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 255]


def test_load_cmyk_jpeg_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (8, 4), (0, 255, 255, 0))  # pure red
    loaded = load_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=100))
    assert loaded.mode == "RGB" and loaded.size == (8, 4)
    r, g, b = np.asarray(loaded).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _save(Image.new("RGB", (20, 10), (0, 0, 0)), tmp_path / "rotated.jpg", exif=exif)
    assert load_image(path).size == (10, 20)


@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".png", "PNG")])
def test_load_truncated(tmp_path, suffix, fmt):
    rng = np.random.default_rng(2)
    path = tmp_path / f"broken{suffix}"
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cannot read image .*broken\{suffix}: .*"):
        load_image(path)


def test_load_not_an_image_missing_and_folder(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a png\n")
    with pytest.raises(ValueError, match=r"cannot read image .*notes\.png: not an image file"):
        load_image(fake)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read image .*empty\.jpg"):
        load_image(empty)
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*missing\.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"got a folder"):
        load_image(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# find_images


def test_find_images_nested(tmp_path):
    for relative in [
        "b.png",
        "a.JPG",
        "notes.txt",
        ".hidden.png",
        "sub/z.jpeg",
        "sub/deeper/y.webp",
        "sub/deeper/readme.md",
        "sub/a.tif",
        ".cache/skipped.png",
        "other/x.bmp",
    ]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.JPG",
        "b.png",
        "other/x.bmp",
        "sub/a.tif",
        "sub/deeper/y.webp",
        "sub/z.jpeg",
    ]
    # Named files are kept whatever their extension, in the order given; repeats are listed once.
    mixed = find_images([tmp_path / "notes.txt", tmp_path / "sub", str(tmp_path / "sub" / "z.jpeg")])
    assert [p.relative_to(tmp_path).as_posix() for p in mixed] == [
        "notes.txt",
        "sub/a.tif",
        "sub/deeper/y.webp",
        "sub/z.jpeg",
    ]
    assert find_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    assert find_images([]) == []
    with pytest.raises(FileNotFoundError, match=r"input not found: .*nothing"):
        find_images([tmp_path / "nothing"])
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# what a hostile input folder holds: special files, link loops, the output tree, stale temporaries


def _image(path, color=(10, 20, 30)):
    Image.new("RGB", (8, 6), color).save(path)
    return path


def test_find_images_reports_special_files_and_goes_on(tmp_path):
    good = _image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "link.png").symlink_to(good)
    skipped = []
    found = find_images(tmp_path, skipped=skipped)
    assert found == [good]  # the link to a.png is the same file: listed once
    reasons = {path.name: reason for path, reason in skipped}
    assert sorted(reasons) == ["dangling.png", "loop.jpg", "pipe.png"]
    assert "named pipe" in reasons["pipe.png"]
    assert "cannot be opened" in reasons["loop.jpg"] and "cannot be opened" in reasons["dangling.png"]


def test_find_images_named_special_file_is_skipped_not_raised(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    skipped = []
    assert find_images([tmp_path / "pipe.png", tmp_path / "loop.png"], skipped=skipped) == []
    assert [path.name for path, _ in skipped] == ["pipe.png", "loop.png"]
    with pytest.raises(FileNotFoundError, match="input not found"):
        find_images(tmp_path / "nothing.png")


def test_load_image_refuses_a_named_pipe_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ValueError, match="named pipe"):
        load_image(tmp_path / "pipe.png")


def test_find_images_leaves_out_the_output_folder_inside_an_input(tmp_path):
    photos = tmp_path / "photos"
    (photos / "out" / "deeper").mkdir(parents=True)
    image = _image(photos / "a.png")
    _image(photos / "out" / "a_labels.png")
    _image(photos / "out" / "deeper" / "b_labels.png")
    assert find_images(photos) == [image, photos / "out" / "a_labels.png", photos / "out" / "deeper" / "b_labels.png"]
    assert find_images(photos, exclude=[photos / "out"]) == [image]
    assert find_images([photos, photos / "out" / "a_labels.png"], exclude=[photos / "out"]) == [image]


def test_check_output_folder_refuses_an_input_folder_or_its_parent(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    check_output_folder(photos / "out", [photos])  # inside: fine, find_images leaves it out
    check_output_folder(tmp_path / "elsewhere", [photos])
    with pytest.raises(ValueError, match="outputs would be read as inputs"):
        check_output_folder(photos, [photos])
    with pytest.raises(ValueError, match="outputs would be read as inputs"):
        check_output_folder(tmp_path, [photos])


def test_remove_stale_temporaries_removes_only_atomic_leftovers(tmp_path):
    (tmp_path / "sub").mkdir()
    keep = [_image(tmp_path / "a_labels.png"), _image(tmp_path / ".hidden.png"), _image(tmp_path / "x.tmp.png")]
    stale = [tmp_path / ".a_labels.0123456789ab.tmp.png", tmp_path / "sub" / ".r.fedcba987654.tmp.json"]
    for path in stale:
        path.write_bytes(b"partial")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in keep) and not any(path.exists() for path in stale)
    with atomic_path(tmp_path / "written.png") as tmp:  # a real temporary name matches the pattern
        tmp.write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path) == [tmp]
        tmp.write_bytes(b"x")  # recreate it so the rename at the end of the block succeeds
    assert (tmp_path / "written.png").exists()


def test_find_images_lists_what_it_ignored(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    _image(photos / "a.png")
    (photos / "notes.txt").write_text("x")
    (photos / "sub").mkdir()
    (photos / "sub" / "data.csv").write_text("x")
    (photos / ".hidden.txt").write_text("x")
    ignored = []
    assert find_images(photos, ignored=ignored) == [photos / "a.png"]
    assert sorted(ignored) == [photos / "notes.txt", photos / "sub" / "data.csv"]


def test_check_output_file_and_folder_refuse_what_cannot_be_written(tmp_path):
    from segformer_fast.core.fileio import check_output_file

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    check_output_file(tmp_path / "new" / "deeper" / "r.json")
    check_output_file(tmp_path / "file")  # replacing a file is a write like any other
    with pytest.raises(ValueError, match="existing folder"):
        check_output_file(tmp_path / "folder")
    with pytest.raises(ValueError, match="is a file"):
        check_output_file(tmp_path / "file" / "r.json")
    check_output_folder(tmp_path / "new" / "out", [])
    with pytest.raises(ValueError, match="is a file"):
        check_output_folder(tmp_path / "file", [])
    with pytest.raises(ValueError, match="lies under"):
        check_output_folder(tmp_path / "file" / "out", [])


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
