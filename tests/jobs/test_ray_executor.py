"""The Ray Data executor on a local Ray cluster: segmentation and evaluation against the single-process command on
the same inputs, a crashed worker retried, resume, the pool arguments, and Ray missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.cli import main
from segformer_fast.core.fileio import find_images
from segformer_fast.jobs.datasets import open_dataset
from segformer_fast.jobs.evaluate import evaluate
from segformer_fast.jobs.manifest import MANIFEST_NAME, read_manifest
from segformer_fast.jobs.predictors import make_predictor
from segformer_fast.jobs.ray_executor import RaySegmentPredictor, evaluate_with_ray, pool_arguments, segment_with_ray
from segformer_fast.jobs.settings import SegmentSettings

from scaleout_support import SIZE, assert_same_outputs, eval_report, manifest_lines, write_images


def test_ray_segment_equals_single_process_and_resumes(ray_session, checkpoint, mixed_folder,
                                                        single_process_output, tmp_path, capsys):
    out = tmp_path / "ray"
    code = main(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(out), *SIZE, "--ray",
                 "--workers", "2", "--batch-size", "4", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, "a failed image must make the exit code 1"
    assert "segmented 18 of 20 images" in captured.out and "images/s" in captured.out, "the words of a plain run"
    assert "2 images failed:" in captured.err
    assert_same_outputs(out, single_process_output)

    records = manifest_lines(out)
    inputs = find_images([mixed_folder])
    assert sorted(r["input"] for r in records) == sorted(str(p.resolve()) for p in inputs), "one record per image"
    failed = {Path(r["input"]).name: r for r in records if r["status"] == "failed"}
    assert set(failed) == {"truncated.jpg", "notes.png"}
    assert all("cannot read image" in r["error"] for r in failed.values())
    for record in records:
        assert set(record) == {"input", "output", "status", "error", "worker", "seconds", "settings"}
        assert record["seconds"] >= 0 and record["worker"]
        if record["status"] == "ok":
            assert record["error"] is None and Path(record["output"]).is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    settings = SegmentSettings(model=str(checkpoint), size=(64, 64), overlay=True)
    summary = segment_with_ray([mixed_folder], out, settings, workers=2, progress=False)
    assert summary.processed == 0 and summary.done_before == 18 and len(summary.failed_before) == 2
    assert summary.exit_code == 1, "the earlier failures still count"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps, "a re-run must do no work"


def test_ray_worker_crash_is_retried(ray_session, checkpoint, tmp_path):
    images = tmp_path / "images"
    write_images(images, 8, seed=5)
    marker = tmp_path / "crashed-once"

    class CrashOnFirstBatch(RaySegmentPredictor):
        """Kills its own process on the first batch any worker sees (the marker file says it happened)."""

        def __call__(self, batch):
            if not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
            return super().__call__(batch)

    CrashOnFirstBatch.marker = str(marker)
    out = tmp_path / "out"
    settings = SegmentSettings(model=str(checkpoint), size=(64, 64))
    summary = segment_with_ray(images, out, settings, workers=1, batch_size=3, progress=False,
                               predictor_class=CrashOnFirstBatch)
    assert marker.exists(), "the worker never crashed: the test proves nothing"
    assert summary.exit_code == 0 and summary.succeeded == 8 and not summary.failed
    records = manifest_lines(out)
    assert len(records) == 8 and len({r["input"] for r in records}) == 8, "every image recorded exactly once"
    for source in find_images(images):
        image = Image.open(source)
        labels = Image.open(out / source.relative_to(images).with_name(source.stem + "_labels.png"))
        labels.load()
        assert labels.size == image.size and labels.mode == "P"
    assert not list(out.rglob("*_overlay.png")), "overlays only when asked"
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_ray_eval_equals_single_process(ray_session, checkpoint, ade_dataset, tmp_path):
    argv = ["--model", str(checkpoint), "--data", str(ade_dataset), "--format", "ade20k", *SIZE, "--device", "cpu",
            "--quiet"]
    single = eval_report(argv, tmp_path / "single.json")
    scaled = eval_report(argv + ["--ray", "--workers", "2", "--batch-size", "2"], tmp_path / "ray.json")
    assert scaled["counts"] == single["counts"] and scaled["counts"]["images"] == 5
    assert scaled["per_class"] == single["per_class"], "per-class areas (the confusion counts) must be equal"
    assert scaled["mIoU"] == single["mIoU"] and scaled["aAcc"] == single["aAcc"] and scaled["mAcc"] == single["mAcc"]


def test_ray_eval_function_matches_counts(ray_session, checkpoint, ade_dataset):
    dataset = open_dataset("ade20k", ade_dataset)
    model = Segformer.from_pretrained(checkpoint)
    expected = evaluate(make_predictor(model, "reference", resize={"size": (64, 64)}), dataset, progress=False)
    settings = SegmentSettings(model=str(checkpoint), engine="reference", size=(64, 64))
    report = evaluate_with_ray(dataset, settings, workers=1, batch_size=3, progress=False)
    def areas(result):
        return [(c["intersection"], c["union"], c["pred_pixels"], c["label_pixels"]) for c in result["per_class"]]

    assert areas(report) == areas(expected) and sum(a[3] for a in areas(report)) > 0
    assert report["mIoU"] == expected["mIoU"] and report["counts"] == expected["counts"]


def test_missing_ray_names_the_extra(checkpoint, mixed_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where ray is not installed
    settings = SegmentSettings(model=str(checkpoint))
    with pytest.raises(ImportError, match=r'pip install "ray\[data\]"'):
        segment_with_ray(mixed_folder, tmp_path / "out", settings)
    code = main(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--ray"])
    assert code == 2 and 'pip install "ray[data]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_package_imports_without_ray():
    code = "import sys, segformer_fast, segformer_fast.cli, segformer_fast.jobs; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_manifest_skips_a_torn_last_line(tmp_path):
    path = tmp_path / MANIFEST_NAME
    whole = {"input": "/a.png", "output": "/o/a_labels.png", "status": "ok", "error": None, "worker": "w",
             "seconds": 0.1}
    path.write_text(json.dumps(whole) + "\n" + json.dumps({**whole, "input": "/b.png"})[:30])
    assert read_manifest(path) == {"/a.png": whole}
    path.write_text('{"something": "else"}\n')
    with pytest.raises(ValueError, match="line 1: not a segformer-fast manifest record"):
        read_manifest(path)


def test_pool_arguments_fit_the_installed_ray(ray_session):
    from ray.data import ActorPoolStrategy

    dataset = ray_session.data.from_items([{"x": 1}])
    arguments = pool_arguments(dataset.map_batches, 3)
    assert len(arguments) == 1
    if "compute" in arguments:
        assert isinstance(arguments["compute"], ActorPoolStrategy)
    else:
        assert arguments == {"concurrency": 3}


def test_resume_redoes_images_whose_outputs_vanished(ray_session, checkpoint, tmp_path):
    images = tmp_path / "images"
    write_images(images, 3, seed=9)
    out = tmp_path / "out"
    settings = SegmentSettings(model=str(checkpoint), size=(64, 64))
    assert segment_with_ray(images, out, settings, progress=False).succeeded == 3
    victim = next(out.rglob("*_labels.png"))
    victim.unlink()
    summary = segment_with_ray(images, out, settings, progress=False)
    assert summary.processed == 1 and victim.is_file()
