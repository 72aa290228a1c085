"""``segformer-fast eval``: its resize defaults and options, end to end in whole and slide mode, and its errors."""

import argparse
import json
import re

import pytest

from segformer_fast.cli.evaluate import add_eval_arguments, resize_from_args
from segformer_fast.cli.evaluate import run as cmd_eval
from segformer_fast.jobs.predictors import make_predictor

from fake_datasets import make_ade20k, make_cityscapes

# ------------------------------------------------------------------------------------------------- CLI plumbing


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_resize_defaults_and_options():
    base = ["--model", "m", "--data", "d"]
    assert resize_from_args(_parse(base + ["--format", "ade20k"])) == {"short_side": 512, "max_long_side": 2048}
    assert resize_from_args(_parse(base + ["--format", "cityscapes"])) == {"short_side": 1024, "max_long_side": 2048}
    assert resize_from_args(_parse(base + ["--format", "ade20k", "--size", "64", "96"])) == {"size": (64, 96)}
    assert resize_from_args(_parse(base + ["--format", "ade20k", "--short-side", "256"])) == {
        "short_side": 256, "max_long_side": 2048}
    with pytest.raises(ValueError, match="--max-long-side needs --short-side"):
        resize_from_args(_parse(base + ["--format", "ade20k", "--max-long-side", "999"]))
    args = _parse(base + ["--format", "ade20k"])
    assert (args.engine, args.mode, args.device, args.dtype, args.compare, args.out, args.limit) == (
        "fast", "whole", "auto", "fp32", None, None, None)
    with pytest.raises(SystemExit):
        _parse(base + ["--format", "ade20k", "--size", "64", "64", "--short-side", "64"])


@pytest.fixture(scope="module")
def random_b0(tmp_path_factory):
    from segformer_fast import Segformer

    folder = tmp_path_factory.mktemp("b0")
    Segformer.from_config("b0", num_labels=150).save_pretrained(folder)
    return folder


def test_eval_command_end_to_end(tmp_path, random_b0, capsys):
    make_ade20k(tmp_path / "ade")
    out = tmp_path / "r.json"
    args = _parse(["--model", str(random_b0), "--data", str(tmp_path / "ade"), "--format", "ade20k",
                   "--limit", "2", "--size", "64", "64", "--compare", "reference", "--device", "cpu",
                   "--out", str(out), "--quiet"])
    assert cmd_eval(args) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "aAcc" in printed and "mAcc" in printed and "pixel agreement" in printed
    assert re.search(r"mIoU +\d+\.\d+ % over \d+ of 150 classes", printed), printed
    report = json.loads(out.read_text())
    for key in ("mIoU", "aAcc", "mAcc", "per_class", "dataset", "counts", "settings", "comparison"):
        assert key in report, key
    assert report["counts"]["images"] == 2
    # the checkpoint's own names (init and from_config write LABEL_i); ADE20K's only with --class-names ade20k
    assert len(report["per_class"]) == 150 and report["per_class"][0]["name"] == "LABEL_0"
    assert set(report["per_class"][0]) >= {"id", "name", "IoU", "Acc"}
    assert report["settings"]["engine"] == "fast" and report["settings"]["resize"] == {"size": [64, 64]}
    c = report["comparison"]
    assert c["against"] == "reference"
    assert 0.0 <= c["mIoU"] <= 1.0 and 0.0 <= c["reference_mIoU"] <= 1.0
    assert 0.0 <= c["pixel_agreement"] <= 1.0 and c["pixel_agreement"] > 0.99


def test_eval_command_slide_mode(tmp_path, random_b0, capsys):
    make_ade20k(tmp_path / "ade")
    out = tmp_path / "r.json"
    args = _parse(["--model", str(random_b0), "--data", str(tmp_path / "ade"), "--format", "ade20k",
                   "--limit", "1", "--size", "64", "64", "--mode", "slide", "--crop", "48", "48",
                   "--stride", "32", "32", "--engine", "reference", "--device", "cpu", "--out", str(out), "--quiet"])
    assert cmd_eval(args) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["mode"] == "slide"
    assert report["settings"]["crop"] == [48, 48] and report["settings"]["stride"] == [32, 32]
    assert 0.0 <= report["mIoU"] <= 1.0 and report["counts"]["images"] == 1
    assert "crop (48, 48)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mode slide only"):
        cmd_eval(_parse(["--model", str(random_b0), "--data", str(tmp_path / "ade"), "--format", "ade20k",
                         "--crop", "32", "32"]))


def test_mode_errors_and_class_mismatch(tmp_path, random_b0):
    from segformer_fast.model.segformer import Segformer

    model = Segformer.from_pretrained(random_b0)
    with pytest.raises(ValueError, match="unknown inference mode"):
        make_predictor(model, "reference", "tiles")
    make_cityscapes(tmp_path / "cs")
    args = _parse(["--model", str(random_b0), "--data", str(tmp_path / "cs"), "--format", "cityscapes",
                   "--device", "cpu", "--quiet"])
    with pytest.raises(ValueError, match="150 classes but cityscapes has 19"):
        cmd_eval(args)
