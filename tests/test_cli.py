"""The segformer-fast command end to end on generated images and a saved random checkpoint."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import Segformer, postprocess, preprocess
from segformer_fast.cli import main
from segformer_fast.fileio import load_image
from segformer_fast.palettes import overlay, palette_for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=5).save_pretrained(folder)
    return folder


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (41, 37), dtype=np.uint8)).save(root / "nested" / "b.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


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
    assert main(["segment", str(image), "--model", str(tmp_path / "missing-ckpt"), "--out", str(tmp_path)]) == 2
    assert "missing-ckpt" in capsys.readouterr().err


def test_info_describes_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "MiT-B0" in text and "3.75 M" in text and "num_labels:      150" in text
    assert "hub" in text and "transformers" in text


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "segformer_fast.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("segment", "info", "bench"):
        assert command in result.stdout
