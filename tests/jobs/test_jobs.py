"""The segment job in one process: manifest, resume, interruption, and the CLI's checks before any work (outputs
that cannot be written, mistyped options, unknown hub ids, Ray-only options without --ray, export's paths). The Ray
and torchrun sides are in test_ray_executor.py and test_executors.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.cli import main
from segformer_fast.jobs import segment as segment_job
from segformer_fast.jobs.manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from segformer_fast.jobs.metrics import MetricAccumulator
from segformer_fast.model.checkpoints import checkpoint_class_names, checkpoint_num_labels

RECORD = {"input": "/a.png", "output": "/o/a_labels.png", "status": "ok", "error": None, "worker": "w", "seconds": 0.1}
COMMON = ["--size", "32", "32", "--engine", "reference", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=3).save_pretrained(folder)
    return folder


def _images(root: Path, count: int) -> Path:
    rng = np.random.default_rng(count)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(root / f"i{index}.png")
    return root


@pytest.fixture()
def unwritable(tmp_path):
    """A folder in which no file can be created (read-only for a user; a kernel folder for root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    os.chmod(folder, 0o500)
    candidates = [folder, Path("/sys/kernel")]
    for candidate in candidates:
        try:
            os.close(os.open(candidate / ".probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            os.unlink(candidate / ".probe")
        except OSError:
            yield candidate
            break
    else:
        pytest.skip("no folder here refuses new files")
    os.chmod(folder, 0o700)


# ---------------------------------------------------------------------------------------------- the manifest
def test_torn_last_line_is_ended_reported_and_skipped(tmp_path):
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "input": "/b.png"})[:30])
    torn = []
    assert read_manifest(path, torn) == {"/a.png": RECORD} and torn == [2]
    with ManifestWriter(path) as writer:
        writer.write({**RECORD, "input": "/c.png"})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["input"] == "/c.png", "the new record must start a new line"
    torn = []
    assert set(read_manifest(path, torn)) == {"/a.png", "/c.png"} and torn == [2]


@pytest.mark.parametrize("content, message", [
    (json.dumps({**RECORD, "input": ["/a.png"]}).encode() + b"\n", "line 1: not a segformer-fast manifest record"),
    (json.dumps(RECORD).encode() + b"\n" + b'{"input": "/\xff.png"}\n', "line 2: not UTF-8"),
    (b'{"something": "else"}\n', "line 1: not a segformer-fast manifest record"),
])
def test_bad_manifest_lines_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / MANIFEST_NAME
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_segment_reports_a_torn_manifest_line_and_resumes(checkpoint, tmp_path, capsys):
    images, out = _images(tmp_path / "in", 3), tmp_path / "out"
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON]) == 0
    manifest = out / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    assert len(lines) == 3, "plain segment writes the manifest"
    manifest.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # killed while writing the last record
    capsys.readouterr()
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 torn line (line 3)" in captured.err
    assert "segmented 1 of 3 images" in captured.out and "(2 already done)" in captured.out
    assert len(read_manifest(manifest)) == 3


def test_other_settings_redo_the_images(checkpoint, tmp_path, capsys):
    images, out = _images(tmp_path / "in", 2), tmp_path / "out"
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON]) == 0
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON]) == 0
    assert "segmented 0 of 2 images" in capsys.readouterr().out
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON[3:],
                 "--size", "64", "64"]) == 0
    assert "segmented 2 of 2 images" in capsys.readouterr().out, "a resume with other settings must redo the work"


# ------------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_gives_one_line_exit_130_and_the_rerun_resumes(checkpoint, tmp_path, capsys, monkeypatch):
    images, out = _images(tmp_path / "in", 3), tmp_path / "out"
    real = segment_job.SegmentWorker.segment_files
    calls = []

    def interrupted_on_the_second_image(self, items, progress=None):
        calls.append(items)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, items, progress)

    monkeypatch.setattr(segment_job.SegmentWorker, "segment_files", interrupted_on_the_second_image)
    code = main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip() == "segformer-fast: interrupted after 1 of 3 images; run the same command again to resume"
    monkeypatch.setattr(segment_job.SegmentWorker, "segment_files", real)
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *COMMON]) == 0
    assert "segmented 2 of 3 images" in capsys.readouterr().out


def test_sigint_in_a_real_process_prints_one_line(checkpoint, tmp_path):
    """The same, for a real Ctrl-C (SIGINT) sent to a segment process once it has recorded an image."""
    import signal
    import time

    images, out = _images(tmp_path / "in", 40), tmp_path / "out"
    command = [sys.executable, "-m", "segformer_fast", "segment", str(images), "--model", str(checkpoint), "--out",
               str(out), "--size", "96", "96", "--engine", "reference", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            manifest = out / MANIFEST_NAME
            if manifest.is_file() and manifest.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().startswith("segformer-fast: interrupted after ")
    assert stderr.strip().endswith("of 40 images; run the same command again to resume")


# ------------------------------------------------------------------------------------------- unwritable outputs
def test_unwritable_outputs_are_refused_before_loading_the_model(unwritable, tmp_path, capsys):
    images = _images(tmp_path / "in", 1)
    missing = str(tmp_path / "no-such-ckpt")
    commands = [
        ["segment", str(images), "--model", missing, "--out", str(unwritable / "out")],
        ["eval", "--model", missing, "--data", str(tmp_path / "no-data"), "--format", "ade20k", "--out",
         str(unwritable / "r.json")],
        ["export", "--model", missing, "--onnx", str(tmp_path / "ok.onnx"), "--pt2", str(unwritable / "b.pt2")],
        ["init", "b0", str(unwritable / "ckpt")],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "cannot write" in err and "no-such-ckpt" not in err and "no-data" not in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ok.onnx").exists()


# ------------------------------------------------------------------------------------------------- usage errors
def test_mistyped_flag_shows_the_verbs_usage_and_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", "a.png", "--model", "m", "--out", "o", "--skip-exsting"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: segformer-fast segment") and "did you mean --skip-existing?" in err


def test_unknown_hub_id_offline_is_one_line_with_the_way_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    images = _images(tmp_path / "in", 1)
    code = main(["segment", str(images), "--model", "nobody/no-such-segformer", "--out", str(tmp_path / "out"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'nobody/no-such-segformer' not found" in err and "segformer-fast init" in err


@pytest.mark.parametrize("flags", [["--workers", "0"], ["--workers", "2"], ["--gpus-per-worker", "1"],
                                   ["--cpus-per-worker", "2"]])
def test_ray_options_without_ray_are_refused(flags, tmp_path, capsys):
    images = _images(tmp_path / "in", 1)
    code = main(["segment", str(images), "--model", str(tmp_path / "no-such-ckpt"), "--out", str(tmp_path / "o"),
                 *flags])
    err = capsys.readouterr().err
    assert code == 2 and "to --ray only" in err and "no-such-ckpt" not in err


# ------------------------------------------------------------------------------------------------ the job's parts
def test_metric_accumulator_counts_and_merge_equal_one_accumulator():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 5, (6, 7)), rng.integers(0, 5, (6, 7))) for _ in range(4)]
    whole, first, second = MetricAccumulator(5), MetricAccumulator(5), MetricAccumulator(5)
    for index, (pred, label) in enumerate(pairs):
        whole.update(pred, label)
        (first if index < 2 else second).update(pred, label)
    merged = MetricAccumulator(5).merge(first).merge(json.loads(json.dumps(second.counts())))
    assert merged.counts() == whole.counts()
    assert merged.compute()["mIoU"] == whole.compute()["mIoU"]
    with pytest.raises(ValueError, match="cannot merge counts of 5 classes into 3"):
        MetricAccumulator(3).merge(first)


def test_class_count_reads_the_config_only(checkpoint, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    assert checkpoint_num_labels(folder) == 150, "a folder's class count comes from config.json, weights unread"
    assert checkpoint_num_labels(checkpoint / "model.safetensors") == 150, "a .safetensors header is enough"


def test_class_names_read_the_config_only(tmp_path):
    folder = tmp_path / "named"
    Segformer.from_config("b0", num_labels=3, seed=1).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "sky", "1": "road", "2": "tree"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()  # not read
    assert checkpoint_class_names(folder) == {0: "sky", 1: "road", 2: "tree"}
    weights = tmp_path / "weights.safetensors"
    Segformer.from_config("b0", num_labels=3, seed=1).save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "model.safetensors").rename(weights)
    assert checkpoint_class_names(weights) == {}, "a weights file alone names no classes"


def test_ctrl_c_during_export_is_one_line(tmp_path, monkeypatch, capsys, checkpoint):
    from segformer_fast.cli import export as export_verb

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_verb, "export_onnx", interrupted)
    assert main(["export", "--model", str(checkpoint), "--onnx", str(tmp_path / "b0.onnx")]) == 130
    assert capsys.readouterr().err == "segformer-fast: interrupted\n"
    assert not list(tmp_path.iterdir())


def test_export_checks_both_paths_and_labels_before_the_work(tmp_path, capsys, checkpoint):
    (tmp_path / "taken").write_text("a file")
    for argv, message in (
        (["--onnx", str(tmp_path / "a.onnx"), "--pt2", str(tmp_path / "taken" / "x.pt2")], "is a file"),
        (["--pt2", str(tmp_path / "b.pt2"), "--labels"], "--labels applies to --onnx only"),
    ):
        assert main(["export", "--model", str(tmp_path / "no-such-ckpt"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-such-ckpt" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
