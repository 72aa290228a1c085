"""Options that would do nothing are refused (before a model is loaded), a re-run with other settings says what it
redoes and what stays, class names are the checkpoint's unless a dataset's are asked for, and the words: paths as
typed, no Python class names, counts that agree, descriptions, a --version that imports no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segformer_fast.cli import main
from segformer_fast.render.palettes import ADE20K_CLASSES

from fake_datasets import make_ade20k


def _write_image(path, height=20, width=30, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------- options that would do nothing
@pytest.mark.parametrize("verb, arguments, message", [
    ("segment", ["--crop", "64", "64"], "--crop and --stride apply to --mode slide and auto only"),
    ("segment", ["--stride", "32", "32"], "--crop and --stride apply to --mode slide and auto only"),
    ("segment", ["--outputs", "labels", "--alpha", "0.3"], "--outputs labels writes no overlay"),
    ("segment", ["--batch-size", "8"], "--batch-size applies to --ray or torchrun only; a plain run takes one"),
    ("eval", ["--batch-size", "8"], "--batch-size applies to --ray only; a plain run takes one image at a time"),
    ("export", ["--pt2", "m.pt2", "--opset", "18"], "--opset applies to --onnx only"),
    ("export", ["--onnx", "m.onnx", "--batch", "2"], "--batch applies to --static only"),
    ("export", ["--onnx", "m.onnx", "--dtype", "bf16"], "--onnx takes --dtype fp16 or fp32, not bf16"),
])
def test_options_that_would_do_nothing_are_refused_before_loading(verb, arguments, message, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_image(tmp_path / "a.png")
    model = ["--model", str(tmp_path / "no-such-ckpt")]
    argv = {"segment": ["segment", "a.png", *model, "--out", "out"],
            "eval": ["eval", *model, "--data", "data", "--format", "ade20k"],
            "export": ["export", *model]}[verb]
    assert main([*argv, *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-ckpt" not in err and len(err.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png"]  # nothing written


def test_eval_has_no_retry_failed_and_its_help_says_nothing_of_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "m", "--data", "d", "--format", "ade20k", "--retry-failed"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --retry-failed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "retry" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "--retry-failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- re-runs with other settings
def test_a_rerun_with_other_settings_says_what_it_redoes_and_what_stays(checkpoint, tmp_path, capsys):
    _write_image(tmp_path / "in" / "room.png", 40, 48)
    common = ["segment", str(tmp_path / "in"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
              "--engine", "reference", "--quiet"]
    assert main([*common, "--outputs", "labels,overlay-jpg", "--size", "64", "64"]) == 0
    capsys.readouterr()
    assert main([*common, "--outputs", "labels,overlay", "--size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "redoing 1 image done before with other settings (resize changed)" in out
    assert "1 file in" in out and "this run does not write" in out and "room_overlay.jpg" in out
    assert "segmented 1 of 1 image into" in out and "(1 redone with these settings)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.jsonl", "room_labels.png", "room_overlay.jpg", "room_overlay.png"]
    assert main([*common, "--outputs", "labels,overlay", "--size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "redoing" not in out and "already done" in out and "room_overlay.jpg" in out


# ------------------------------------------------------------------------------------------------------ class names
def test_info_shows_the_checkpoint_names_unless_a_dataset_is_named(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "labels:          0: LABEL_0, 1: LABEL_1" in out and "wall" not in out and "(150 in all)" in out
    assert main(["info", str(checkpoint), "--class-names", "ade20k"]) == 0
    assert "labels:          0: wall, 1: building" in capsys.readouterr().out
    assert main(["info", str(checkpoint), "--class-names", "cityscapes"]) == 2
    assert "cityscapes has 19 classes but the checkpoint predicts 150" in capsys.readouterr().err


def test_eval_reports_the_checkpoint_names_unless_a_dataset_is_named(checkpoint, tmp_path, capsys):
    make_ade20k(tmp_path / "ade")
    common = ["eval", "--model", str(checkpoint), "--data", str(tmp_path / "ade"), "--format", "ade20k", "--limit",
              "1", "--size", "32", "32", "--engine", "reference", "--quiet"]
    for extra, first in (([], "LABEL_0"), (["--class-names", "ade20k"], ADE20K_CLASSES[0])):
        out = tmp_path / f"report{len(extra)}.json"
        assert main([*common, *extra, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        report = json.loads(out.read_text())
        assert report["per_class"][0]["name"] == first
        names = {entry["name"] for entry in report["per_class"]}
        assert (names & set(ADE20K_CLASSES)) == (set(ADE20K_CLASSES) if extra else set())
        assert ("LABEL_" in printed) == (not extra)
        assert report["units"].startswith("fractions in [0, 1]") and "1 image in" in printed


# ------------------------------------------------------------------------------------------------------------ words
def test_failures_name_the_path_as_typed_without_python_class_names(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_image(tmp_path / "photos" / "good.png")
    _write_image(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "photos" / "corrupt.jpg").write_bytes(data[:len(data) // 2])  # a JPEG cut in the middle
    assert main(["segment", "photos", "--model", str(checkpoint), "--out", "out", "--engine", "reference",
                 "--size", "32", "32", "--quiet"]) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("failed "))
    assert line.startswith("failed photos/corrupt.jpg: cannot read image: truncated or corrupt image data (")
    assert "Truncated File Read" in line  # PIL's own words come after ours
    assert str(tmp_path) not in err and "Error:" not in err
    assert "  photos/corrupt.jpg: cannot read image: truncated or corrupt image data" in err


def test_eval_names_both_ade20k_layouts_when_neither_is_there(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["eval", "--model", str(tmp_path / "no-such-ckpt"), "--data", str(tmp_path / "photos"),
                 "--format", "ade20k"]) == 2
    err = capsys.readouterr().err
    assert "no ADE20K layout in" in err and "images/validation" in err and "annotations/validation" in err
    assert err.count("images") >= 2


@pytest.mark.parametrize("verb", ["info", "eval", "export", "segment", "init"])
def test_every_command_has_a_description(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    help_text = capsys.readouterr().out
    usage, _, rest = help_text.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert not description.startswith(("positional arguments", "options")) and len(description.split()) >= 10


def test_version_is_answered_without_importing_torch():
    """Checks what makes --version fast (torch, seconds to import, is never imported), not a time."""
    code = ("import sys\n"
            "from segformer_fast.cli import main\n"
            "code = main(['--version'])\n"
            "print(code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    from segformer_fast import __version__

    assert done.returncode == 0 and done.stdout.splitlines() == [f"segformer-fast {__version__}", "0 False"]
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "segformer_fast", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"segformer-fast {__version__}"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "segformer_fast.cli" in imported and "torch" not in imported


def test_ctrl_c_counts_as_the_bar_does(checkpoint, tmp_path, capsys, monkeypatch):
    """The interrupted line counts the images of this run, as the bar does, and the earlier ones apart."""
    from segformer_fast.jobs import segment as segment_job

    _write_image(tmp_path / "in" / "a.png", seed=1)
    common = ["segment", str(tmp_path / "in"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
              "--engine", "reference", "--size", "32", "32"]
    assert main([*common, "--quiet"]) == 0
    for index in (2, 3, 4):
        _write_image(tmp_path / "in" / f"{index}.png", seed=index)
    real, calls = segment_job.SegmentWorker.segment_files, []

    def interrupted_on_the_second_image(self, items, progress=None):
        calls.append(items)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, items, progress)

    monkeypatch.setattr(segment_job.SegmentWorker, "segment_files", interrupted_on_the_second_image)
    capsys.readouterr()
    assert main(common) == 130
    err = capsys.readouterr().err
    assert "1/3" in err and "2/3" not in err and "/4" not in err  # the bar: this run's 3 images
    assert err.strip().splitlines()[-1] == ("segformer-fast: interrupted after 1 of 3 images (1 done before); run "
                                            "the same command again to resume")
