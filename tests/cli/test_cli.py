"""The segformer-fast command end to end on generated images and a saved random checkpoint: segment in every mode
and engine, info, the console script, awkward files, resume, huge images and out-of-memory."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import Segformer, postprocess, preprocess
from segformer_fast.cli import main
from segformer_fast.core.fileio import load_image
from segformer_fast.render.palettes import overlay, palette_for


def test_segment_folder_writes_labels_and_overlays(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(image_folder), "--model", str(checkpoint), "--out", str(out), "--size", "64", "64",
                 "--engine", "reference", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, "one corrupt image must make the exit code non-zero"
    assert "corrupt.png" in captured.err
    assert "segmented 2 of 3" in captured.out

    model = Segformer.from_pretrained(checkpoint)
    palette = palette_for(150)
    for relative in ("a", "nested/b"):
        source = next(image_folder.glob(relative + ".*"))
        image = load_image(source)
        with torch.no_grad():
            expected = postprocess(model(preprocess(image, size=(64, 64))), (image.height, image.width))[0].numpy()
        label_png = Image.open(out / f"{relative}_labels.png")
        assert label_png.mode == "P"
        np.testing.assert_array_equal(np.asarray(label_png), expected)
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / f"{relative}_overlay.png").convert("RGB")),
            np.asarray(overlay(image, expected, palette)),
        )
    assert not list(out.rglob(".*")), "temporary files left behind"


@pytest.mark.parametrize("engine", ["fast", "transformers"])
def test_segment_engines_agree_with_reference(engine, checkpoint, image_folder, tmp_path):
    if engine == "transformers":
        pytest.importorskip("transformers")
    outputs = {}
    for name in ("reference", engine):
        out = tmp_path / name
        main(["segment", str(image_folder / "a.jpg"), "--model", str(checkpoint), "--out", str(out), "--size", "64",
              "64", "--engine", name, "--quiet"])
        outputs[name] = np.asarray(Image.open(out / "a_labels.png"))
    agreement = float((outputs["reference"] == outputs[engine]).mean())
    assert agreement > 0.999, f"--engine {engine}: only {agreement:.4f} of the labels agree with the reference"


def test_segment_missing_input_and_missing_model(checkpoint, tmp_path, capsys):
    assert main(["segment", str(tmp_path / "nope"), "--model", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    # (--out beside the image: an image inside the output folder is never read as input)
    assert main(["segment", str(image), "--model", str(tmp_path / "missing-ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing-ckpt" in capsys.readouterr().err


def test_info_describes_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "MiT-B0" in text and "3.75 M" in text and "num_labels:      150" in text
    assert "hub" in text and "transformers" in text


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "segformer_fast.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("segment", "info", "eval"):
        assert command in result.stdout
    assert "bench" not in result.stdout  # the benchmarks are scripts in benchmarks/, outside the package


@pytest.fixture()
def awkward_folder(tmp_path):
    """Readable images of every awkward kind plus two unreadable files."""
    rng = np.random.default_rng(11)
    root = tmp_path / "awkward"
    root.mkdir()
    Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8), "L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (40, 90), dtype=np.uint16)).save(root / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)).save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    return root


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_segment_survives_awkward_and_broken_files(engine, checkpoint, awkward_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(awkward_folder), "--model", str(checkpoint), "--out", str(out), "--size", "64", "64",
                 "--engine", engine, "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "segmented 4 of 6" in captured.out
    assert "2 images failed" in captured.err
    for name in ("truncated.jpg", "notes.jpg"):
        assert name in captured.err
    for stem, size in (("gray", (60, 80)), ("rgba", (50, 70)), ("deep16", (40, 90)), ("whole", (120, 100))):
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == size
        assert Image.open(out / f"{stem}_overlay.png").size == (size[1], size[0])
    assert not (out / "truncated_labels.png").exists() and not (out / "notes_labels.png").exists()
    assert not list(out.rglob(".*")), "temporary files left behind"


def test_segment_skip_existing_resumes(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(checkpoint), "--out", str(out), "--size", "64", "64", "--engine", "reference", "--quiet"]
    # a "partial run": only a.jpg was done
    assert main(["segment", str(image_folder / "a.jpg"), *common]) == 0
    capsys.readouterr()
    done = out / "a_labels.png", out / "a_overlay.png"
    mtimes = [p.stat().st_mtime_ns for p in done]
    (image_folder / "corrupt.png").unlink()
    code = main(["segment", str(image_folder), *common, "--skip-existing"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped 1 of 2 images" in captured.out
    assert f"segmented 1 of 2 images into {out} (1 already done)" in captured.out
    assert [p.stat().st_mtime_ns for p in done] == mtimes, "an existing output was rewritten"
    assert (out / "nested" / "b_labels.png").is_file() and (out / "nested" / "b_overlay.png").is_file()
    # everything done: nothing to load, nothing rewritten
    code = main(["segment", str(image_folder), *common, "--skip-existing"])
    printed = capsys.readouterr().out
    assert code == 0 and "skipped 2 of 2 images" in printed
    assert f"segmented 0 of 2 images into {out} (2 already done)" in printed
    # only one of the two outputs: the image is redone
    (out / "a_overlay.png").unlink()
    assert main(["segment", str(image_folder), *common, "--skip-existing"]) == 0
    assert "skipped 1 of 2 images" in capsys.readouterr().out
    assert (out / "a_overlay.png").is_file()


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_segment_slide_mode_end_to_end(engine, checkpoint, tmp_path, capsys):
    from segformer_fast.inference.slide import slide_logits

    rng = np.random.default_rng(5)
    source = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "out"
    code = main(["segment", str(source), "--model", str(checkpoint), "--out", str(out), "--mode", "slide",
                 "--crop", "64", "64", "--stride", "48", "48", "--engine", engine, "--quiet"])
    assert code == 0, capsys.readouterr().err
    model = Segformer.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = slide_logits(model, preprocess(load_image(source), size=(150, 200)), 150, crop=(64, 64),
                              stride=(48, 48))
    expected = logits.argmax(1)[0].numpy()
    got = np.asarray(Image.open(out / "big_labels.png"))
    assert got.shape == (150, 200)
    agreement = float((got == expected).mean())
    assert agreement > (0.999 if engine == "fast" else 1.0 - 1e-12), agreement


def test_segment_rejects_bad_window(checkpoint, image_folder, tmp_path, capsys):
    code = main(["segment", str(image_folder), "--model", str(checkpoint), "--out", str(tmp_path / "o"), "--mode",
                 "slide", "--crop", "32", "32", "--stride", "48", "48"])
    assert code == 2
    assert "stride must not exceed the crop" in capsys.readouterr().err


def test_segment_reports_huge_images_and_continues(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a.jpg (6300 px) is then a "decompression bomb"
    out = tmp_path / "out"
    code = main(["segment", str(image_folder / "a.jpg"), str(image_folder / "nested" / "b.png"), "--model",
                 str(checkpoint), "--out", str(out), "--size", "64", "64", "--engine", "reference", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "a.jpg" in captured.err and "segmented 1 of 2" in captured.out
    assert (out / "b_labels.png").is_file()


def test_segment_out_of_memory_whole_fails_auto_slides(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    from segformer_fast.engine.engine import SegformerEngine

    def out_of_memory(self, pixel_values, sizes):
        raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(SegformerEngine, "whole_labels", out_of_memory)
    common = [str(image_folder / "a.jpg"), "--model", str(checkpoint), "--quiet"]
    assert main(["segment", *common, "--out", str(tmp_path / "whole"), "--mode", "whole"]) == 1
    captured = capsys.readouterr()
    assert "a.jpg" in captured.err and "out of memory" in captured.err
    assert main(["segment", *common, "--crop", "64", "64", "--out", str(tmp_path / "auto"), "--mode", "auto"]) == 0
    captured = capsys.readouterr()
    assert "a.jpg" in captured.err and "sliding windows with crop 64x64 and stride 43x43" in captured.err
    assert np.asarray(Image.open(tmp_path / "auto" / "a_labels.png")).shape == (70, 90)
