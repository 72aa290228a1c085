"""What a new user and a hostile tester hit: every check of the segformer-fast command runs before the model is
loaded, colliding or nested outputs are refused, special files are reported, and the help, notes and init behave."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.cli import common as cli_common
from segformer_fast.cli import main

# ---------------------------------------------------------------------------------------------------------------
# What a new user and a hostile tester hit: every check runs before the model is loaded (a missing checkpoint
# shows it: the error must be about the argument, not the checkpoint), and nothing is lost or read twice.


def _write_image(path, height=20, width=30, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("layout", ["same folder", "two input folders"])
def test_segment_refuses_inputs_whose_outputs_collide(layout, checkpoint, tmp_path, capsys):
    if layout == "same folder":
        first, second = tmp_path / "in" / "a.jpg", tmp_path / "in" / "a.png"
        inputs = [str(tmp_path / "in")]
    else:
        first, second = tmp_path / "day" / "x.png", tmp_path / "night" / "x.png"
        inputs = [str(tmp_path / "day"), str(tmp_path / "night")]
    _write_image(first, seed=1)
    _write_image(second, seed=2)
    out = tmp_path / "out"
    code = main(["segment", *inputs, "--model", str(checkpoint), "--out", str(out), "--size", "32", "32",
                 "--engine", "reference", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(first) in err and str(second) in err and "overwrite" in err
    assert "\n" not in err.strip(), "expected a one-line error"
    assert not out.exists(), "nothing may be written when the run is refused"


def test_segment_output_inside_input_is_never_read_as_input(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    _write_image(photos / "a.png", seed=3)
    _write_image(photos / "sub" / "b.png", seed=4)
    out = photos / "labels"
    command = ["segment", str(photos), "--model", str(checkpoint), "--out", str(out), "--size", "32", "32",
               "--engine", "reference", "--quiet"]
    assert main(command) == 0
    assert "segmented 2 of 2 images" in capsys.readouterr().out
    assert main(command + ["--skip-existing"]) == 0
    assert f"segmented 0 of 2 images into {out} (2 already done)" in capsys.readouterr().out
    assert not list(out.rglob("*_labels_labels.png"))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a_labels.png", "a_overlay.png", "sub/b_labels.png", "sub/b_overlay.png"]


@pytest.mark.parametrize("out_relative", [".", "..", "photos"])
def test_segment_refuses_an_output_folder_that_holds_the_inputs(out_relative, checkpoint, tmp_path, capsys):
    photos = tmp_path / "parent" / "photos"
    _write_image(photos / "a.png")
    out = photos / out_relative if out_relative != "photos" else photos
    code = main(["segment", str(photos), "--model", str(tmp_path / "no-such-ckpt"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "read as inputs" in err and "no-such-ckpt" not in err


def test_segment_resume_removes_stale_temporaries(checkpoint, tmp_path, capsys):
    _write_image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    (out / "nested").mkdir(parents=True)
    stale = [out / ".a_labels.0123456789ab.tmp.png", out / "nested" / ".b_overlay.abcdef012345.tmp.png"]
    for path in stale:
        path.write_bytes(b"half a png")
    kept = out / ".keep"
    kept.write_text("not ours")
    assert main(["segment", str(tmp_path / "in"), "--model", str(checkpoint), "--out", str(out), "--size", "32",
                 "32", "--engine", "reference", "--quiet", "--skip-existing"]) == 0
    assert "removed 2 temporary files" in capsys.readouterr().out
    assert not any(path.exists() for path in stale)
    assert kept.read_text() == "not ours"
    assert (out / "a_labels.png").is_file()


def test_segment_reports_special_files_and_goes_on(checkpoint, tmp_path, capsys):
    import os

    root = tmp_path / "in"
    _write_image(root / "a.png")
    os.mkfifo(root / "pipe.png")
    os.symlink(root / "loop2.jpg", root / "loop1.jpg")
    os.symlink(root / "loop1.jpg", root / "loop2.jpg")
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["segment", str(root), "--model", str(checkpoint), "--out", str(out), "--size", "32", "32",
                 "--engine", "reference", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("pipe.png", "loop1.jpg", "loop2.jpg"):
        assert name in captured.err
    assert "named pipe" in captured.err
    assert "segmented 1 of 1 image into" in captured.out
    assert "skipped 3 files that are not regular files" in captured.out
    assert "ignored 1 file without an image extension" in captured.out and "notes.txt" in captured.out
    assert (out / "a_labels.png").is_file()


def test_segment_summary_grammar_for_one_failure(checkpoint, tmp_path, capsys):
    _write_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    code = main(["segment", str(tmp_path / "in"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--size", "32", "32", "--engine", "reference", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 image failed:" in captured.err and "1 images" not in captured.err
    assert "segmented 1 of 2 images into" in captured.out and "(1 failed)" in captured.out


@pytest.mark.parametrize("arguments, message", [
    (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["--alpha", "nan"], "--alpha must be between 0 and 1"),
    (["--size", "0", "32"], "size"),
    (["--short-side", "0"], "short_side"),
    (["--short-side", "512", "--max-long-side", "256"], "max_long_side must be >= short_side"),
    (["--max-long-side", "256"], "--max-long-side needs --short-side"),
    (["--mode", "slide", "--crop", "0", "32"], "crop must be positive"),
    (["--device", "tpu"], "unknown device"),
])
def test_segment_checks_arguments_before_loading_the_model(arguments, message, tmp_path, capsys):
    _write_image(tmp_path / "a.png")
    code = main(["segment", str(tmp_path / "a.png"), "--model", str(tmp_path / "no-such-ckpt"), "--out",
                 str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "no-such-ckpt" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_segment_out_naming_a_file_is_refused_first(tmp_path, capsys):
    _write_image(tmp_path / "a.png")
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        code = main(["segment", str(tmp_path / "a.png"), "--model", str(tmp_path / "no-such-ckpt"), "--out",
                     str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "is a file" in err and "no-such-ckpt" not in err
    assert (tmp_path / "taken").read_text() == "a file"


def test_eval_out_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "existing").mkdir()
    code = main(["eval", "--model", str(tmp_path / "no-such-ckpt"), "--data", str(tmp_path / "no-data"),
                 "--format", "ade20k", "--out", str(tmp_path / "existing")])
    err = capsys.readouterr().err
    assert code == 2 and "existing folder" in err and "no-such-ckpt" not in err and "no-data" not in err


def test_slide_mode_shows_window_progress_and_auto_says_what_it_chose(checkpoint, tmp_path, capsys):
    _write_image(tmp_path / "big.png", 100, 130, seed=6)
    common = [str(tmp_path / "big.png"), "--model", str(checkpoint), "--engine", "reference"]
    assert main(["segment", *common, "--out", str(tmp_path / "slide"), "--mode", "slide", "--crop", "64", "64",
                 "--stride", "48", "48"]) == 0
    err = capsys.readouterr().err
    # the bar counts the 2 x 3 windows as they run (the label pass between window rows is no step of it)
    assert "big.png" in err and "6/6" in err and "window" in err and "7/7" not in err and "step" not in err
    assert main(["segment", *common, "--out", str(tmp_path / "auto"), "--mode", "auto"]) == 0
    assert "mode auto chose whole image at 100x130" in capsys.readouterr().err
    assert main(["segment", *common, "--out", str(tmp_path / "quiet"), "--mode", "slide", "--crop", "64", "64",
                 "--quiet"]) == 0
    assert "window" not in capsys.readouterr().err


def test_auto_fallback_is_announced(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    from segformer_fast.engine.engine import SegformerEngine

    def out_of_memory(self, pixel_values, sizes):
        raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(SegformerEngine, "whole_labels", out_of_memory)
    assert main(["segment", str(image_folder / "a.jpg"), "--model", str(checkpoint), "--crop", "64", "64",
                 "--out", str(tmp_path / "auto"), "--mode", "auto"]) == 0
    assert "mode auto chose sliding windows at 70x90" in capsys.readouterr().err


def test_help_is_plain_text_and_version_is_shown(capsys):
    parser_texts = []
    for command in ([], ["segment"], ["eval"], ["info"], ["init"], ["export"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        parser_texts.append(capsys.readouterr().out)
    for text in parser_texts:
        assert "``" not in text and ":func:" not in text
    assert "compute dtype" in parser_texts[1] and "compute dtype" in parser_texts[2]
    assert "16-bit" in parser_texts[1]
    assert main(["--version"]) == 0
    from segformer_fast import __version__

    assert capsys.readouterr().out.strip() == f"segformer-fast {__version__}"


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_half_precision_on_cpu_gets_a_note(checkpoint, tmp_path, capsys, monkeypatch, fast_bf16):
    """fp16 on a CPU always gets the note; bf16 only where the CPU has no native bf16."""
    monkeypatch.setattr(cli_common, "cpu_has_fast_bf16", lambda: fast_bf16)
    _write_image(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--size", "32", "32", "--engine", "reference", "--dtype", "fp16", "--device", "cpu",
                 "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "fp16 on CPU is usually slower than fp32" in notes[0]
    assert main(["segment", str(tmp_path / "a.png"), "--model", str(checkpoint), "--out", str(tmp_path / "out16"),
                 "--size", "32", "32", "--engine", "reference", "--dtype", "bf16", "--device", "cpu",
                 "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    if fast_bf16:
        assert notes == []
    else:
        assert len(notes) == 1 and "bf16 on this CPU is usually slower than fp32" in notes[0]
    assert main(["segment", str(tmp_path / "a.png"), "--model", str(checkpoint), "--out", str(tmp_path / "out32"),
                 "--size", "32", "32", "--engine", "reference", "--device", "cpu", "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_init_writes_a_loadable_random_checkpoint_and_never_replaces_one(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "README.txt").write_text("mine")
    assert main(["init", "b0", str(folder), "--num-labels", "7", "--seed", "3"]) == 0
    assert "random weights" in capsys.readouterr().out
    model = Segformer.from_pretrained(folder)
    assert model.config.variant == "b0" and model.config.num_labels == 7
    expected = Segformer.from_config("b0", num_labels=7, seed=3)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert (folder / "README.txt").read_text() == "mine"
    weights = (folder / "model.safetensors").read_bytes()
    assert main(["init", "b1", str(folder)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == weights
    assert main(["init", "b0", str(tmp_path / "other"), "--num-labels", "0"]) == 2
    assert "--num-labels" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["malformed config", "weights are a folder", "no weights", "numbered keys"])
def test_bad_checkpoints_give_one_line_and_exit_2(damage, tmp_path):
    folder = tmp_path / "ckpt"
    Segformer.from_config("b0", num_labels=3).save_pretrained(folder)
    if damage == "numbered keys":
        folder = tmp_path / "numbered.pth"
        torch.save({0: torch.zeros(2)}, folder)
    elif damage == "malformed config":
        (folder / "config.json").write_text('{"num_labels": null, "hidden_sizes": "wide", "id2label": {"x": 1}}')
    elif damage == "weights are a folder":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").mkdir()
    else:
        (folder / "model.safetensors").unlink()
    _write_image(tmp_path / "a.png")
    result = subprocess.run([sys.executable, "-m", "segformer_fast.cli", "segment", str(tmp_path / "a.png"),
                             "--model", str(folder), "--out", str(tmp_path / "out"), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segformer-fast: ") and str(folder) in lines[0]


def test_segment_without_images_says_what_it_found_instead(tmp_path, capsys):
    import os

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    os.mkfifo(tmp_path / "in" / "pipe.jpg")
    code = main(["segment", str(tmp_path / "in"), "--model", str(tmp_path / "no-such-ckpt"), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no images found" in err
    assert "skipped 1 file that is not a regular file" in err and "pipe.jpg" in err
    assert "ignored 1 file without an image extension" in err and "notes.txt" in err
