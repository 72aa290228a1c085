"""Scale-out: Ray Data segmentation and evaluation on a local Ray cluster, and torchrun with 2 CPU processes (gloo),
each against the single-process command on the same inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval import make_ade20k

from segformer_fast import Segformer
from segformer_fast.cli import main
from segformer_fast.core.fileio import find_images
from segformer_fast.jobs.datasets import open_dataset
from segformer_fast.jobs.evaluate import evaluate
from segformer_fast.jobs.manifest import MANIFEST_NAME, read_manifest
from segformer_fast.jobs.predictors import make_predictor
from segformer_fast.jobs.ray_executor import RaySegmentPredictor, evaluate_with_ray, pool_arguments, segment_with_ray
from segformer_fast.jobs.settings import SegmentSettings

SIZE = ["--size", "64", "64"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason='ray is not installed (pip install "ray[data]")')
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=11).save_pretrained(folder)
    return folder


def _write_images(root: Path, count: int, seed: int) -> None:
    """``count`` random images of mixed sizes and kinds (RGB jpg, gray png, RGBA png), some in nested folders."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(24, 96, size=2))
        folder = root / ("nested" if index % 3 == 1 else "") / ("deeper" if index % 5 == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        if index % 3 == 0:
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"img{index}.jpg")
        elif index % 3 == 1:
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(folder / f"img{index}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").save(
                folder / f"img{index}.png")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """18 readable images, one truncated PNG and one text file named like an image: 20 inputs."""
    root = tmp_path_factory.mktemp("mixed") / "images"
    _write_images(root, 18, seed=3)
    good = (root / "img0.jpg").read_bytes()
    (root / "nested" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.png").write_text("not an image at all\n")
    return root


@pytest.fixture(scope="module")
def single_process_output(checkpoint, mixed_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    code = main(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(out), *SIZE, "--quiet"])
    assert code == 1, "the broken inputs must make the single-process exit code 1"
    return out


def _outputs(out: Path) -> list:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))


def _assert_same_outputs(out: Path, expected: Path) -> None:
    names = _outputs(expected)
    assert names and _outputs(out) == names
    for name in names:
        got, want = Image.open(out / name), Image.open(expected / name)
        assert got.mode == want.mode, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def _manifest_lines(out: Path) -> list:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def test_ray_segment_equals_single_process_and_resumes(ray_session, checkpoint, mixed_folder,
                                                        single_process_output, tmp_path, capsys):
    out = tmp_path / "ray"
    code = main(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(out), *SIZE, "--ray",
                 "--workers", "2", "--batch-size", "4", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, "a failed image must make the exit code 1"
    assert "segmented 18 of 20 images" in captured.out and "images/s" in captured.out, "the words of a plain run"
    assert "2 images failed:" in captured.err
    _assert_same_outputs(out, single_process_output)

    records = _manifest_lines(out)
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
    _write_images(images, 8, seed=5)
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
    records = _manifest_lines(out)
    assert len(records) == 8 and len({r["input"] for r in records}) == 8, "every image recorded exactly once"
    for source in find_images(images):
        image = Image.open(source)
        labels = Image.open(out / source.relative_to(images).with_name(source.stem + "_labels.png"))
        labels.load()
        assert labels.size == image.size and labels.mode == "P"
    assert not list(out.rglob("*_overlay.png")), "overlays only when asked"
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


@pytest.fixture(scope="module")
def ade_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    make_ade20k(root, sizes=[(40, 56), (44, 56), (40, 60), (52, 48), (36, 64)])
    return root


def _eval(argv, out: Path) -> dict:
    assert main(["eval", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_ray_eval_equals_single_process(ray_session, checkpoint, ade_dataset, tmp_path):
    argv = ["--model", str(checkpoint), "--data", str(ade_dataset), "--format", "ade20k", *SIZE, "--device", "cpu",
            "--quiet"]
    single = _eval(argv, tmp_path / "single.json")
    scaled = _eval(argv + ["--ray", "--workers", "2", "--batch-size", "2"], tmp_path / "ray.json")
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


def _torchrun(args, cwd: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "segformer_fast", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_torchrun_segment_and_eval_equal_single_process(checkpoint, mixed_folder, single_process_output,
                                                         ade_dataset, tmp_path):
    out = tmp_path / "torchrun"
    result = _torchrun(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(out), *SIZE,
                        "--device", "cpu", "--batch-size", "3", "--quiet"], tmp_path)
    assert result.returncode != 0, "the broken inputs must make the exit code non-zero"
    assert result.stdout.count("segmented 18 of 20 images") == 1, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_same_outputs(out, single_process_output)
    records = _manifest_lines(out)
    assert len(records) == 20 and len({r["input"] for r in records}) == 20, "sharded without duplicates"
    assert {r["worker"].split()[1] for r in records} == {"0", "1"}, "both ranks did work"

    argv = ["--model", str(checkpoint), "--data", str(ade_dataset), "--format", "ade20k", *SIZE, "--device", "cpu",
            "--quiet"]
    single = _eval(argv, tmp_path / "single.json")
    result = _torchrun(["eval", *argv, "--out", str(tmp_path / "torchrun.json")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("mIoU") == 1, "rank 0 alone prints the summary"
    scaled = json.loads((tmp_path / "torchrun.json").read_text())
    assert scaled["counts"] == single["counts"] and scaled["per_class"] == single["per_class"]
    assert scaled["mIoU"] == single["mIoU"]


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
    _write_images(images, 3, seed=9)
    out = tmp_path / "out"
    settings = SegmentSettings(model=str(checkpoint), size=(64, 64))
    assert segment_with_ray(images, out, settings, progress=False).succeeded == 3
    victim = next(out.rglob("*_labels.png"))
    victim.unlink()
    summary = segment_with_ray(images, out, settings, progress=False)
    assert summary.processed == 1 and victim.is_file()


# ----------------------------------------------------------------------------- issue 21: the same job everywhere
def _special_folder(root: Path) -> Path:
    _write_images(root, 3, seed=21)
    os.mkfifo(root / "pipe.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def _summary_words(text: str, out: Path) -> list:
    """The summary lines with the output folder named alike and the timing line left out."""
    return [line.replace(str(out), "OUT") for line in text.splitlines() if "images/s" not in line]


def test_every_executor_reports_in_the_same_words(ray_session, checkpoint, tmp_path, capsys):
    images = _special_folder(tmp_path / "in")
    words = {}
    for name, extra in (("plain", []), ("ray", ["--ray", "--batch-size", "2"])):
        out = tmp_path / name
        code = main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *SIZE, "--quiet", *extra])
        captured = capsys.readouterr()
        assert code == 1
        assert f"skipped {images / 'pipe.png'}: it is a named pipe" in captured.err
        assert f"failed {(images / 'broken.png').resolve()}: ValueError: cannot read image: " in captured.err
        line = next(line for line in captured.err.splitlines() if line.startswith("failed "))
        assert line.count("broken.png") == 1, f"the error repeats the path: {line}"
        words[name] = _summary_words(captured.out, out)
    assert words["ray"] == words["plain"]
    assert words["plain"][0] == "segmented 3 of 4 images into OUT (1 failed)"
    assert "skipped 1 file that is not a regular file (named above)" in words["plain"]
    assert any(line.startswith("ignored 1 file without an image extension") for line in words["plain"])
    assert (tmp_path / "ray" / MANIFEST_NAME).read_text().count("\n") == 4


def test_ray_skip_existing_after_a_plain_run_redoes_nothing(ray_session, checkpoint, tmp_path, capsys, monkeypatch):
    images = tmp_path / "in"
    _write_images(images, 4, seed=22)
    out = tmp_path / "out"
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *SIZE, "--quiet"]) == 0
    (out / MANIFEST_NAME).unlink()  # outputs without records: an older run, or one killed before recording
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    stale = out / ".img0_labels.0123456789ab.tmp.png"
    stale.write_bytes(b"half a png")
    capsys.readouterr()
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(out), *SIZE, "--quiet", "--ray",
                 "--skip-existing"]) == 0
    printed = capsys.readouterr().out
    assert "removed 1 temporary file" in printed and f"segmented 0 of 4 images into {out} (4 already done)" in printed
    assert not stale.exists() and {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    # a plain run's manifest: a Ray re-run (the checkpoint given by a relative path this time) resumes from it
    assert main(["segment", str(images), "--model", str(checkpoint), "--out", str(tmp_path / "again"), *SIZE,
                 "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(checkpoint.parent)
    assert main(["segment", str(images), "--model", checkpoint.name, "--out", str(tmp_path / "again"), *SIZE,
                 "--quiet", "--ray"]) == 0
    assert "(4 already done)" in capsys.readouterr().out


def test_relative_model_path_under_ray(ray_session, checkpoint, tmp_path, monkeypatch, capsys):
    images = tmp_path / "in"
    _write_images(images, 2, seed=23)
    monkeypatch.chdir(checkpoint.parent)
    code = main(["segment", str(images), "--model", checkpoint.name, "--out", str(tmp_path / "out"), *SIZE,
                 "--quiet", "--ray"])
    assert code == 0, capsys.readouterr().err
    assert "segmented 2 of 2 images" in capsys.readouterr().out


def test_ray_refusals_before_any_work(ray_session, checkpoint, ade_dataset, tmp_path, capsys):
    images = tmp_path / "in"
    _write_images(images, 2, seed=24)
    out = tmp_path / "out"
    cases = [
        (["segment", str(images), "--model", str(tmp_path / "no_such_ckpt"), "--out", str(out), "--ray"],
         "checkpoint not found"),
        (["segment", str(images), "--model", str(checkpoint), "--out", str(out), "--ray", "--gpus-per-worker", "1"],
         "--gpus-per-worker 1: the Ray cluster has no GPUs"),
        (["segment", str(images), "--model", str(checkpoint), "--out", str(out), "--ray", "--cpus-per-worker", "64"],
         "--cpus-per-worker 64: the Ray cluster has at most"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.rglob("*.png"))


def test_ray_eval_worker_error_is_one_line(ray_session, checkpoint, tmp_path, capsys):
    root = tmp_path / "ade"
    make_ade20k(root, sizes=[(40, 56), (44, 56)])
    label = next((root / "annotations").rglob("*.png"))
    Image.open(label).resize((20, 30)).save(label)  # an annotation of the wrong size
    code = main(["eval", "--model", str(checkpoint), "--data", str(root), "--format", "ade20k", *SIZE, "--quiet",
                 "--ray"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("segformer-fast: the Ray workers failed: ValueError: ") and "annotation size" in err


def test_unreachable_ray_address_ends_fast_with_one_line(checkpoint, tmp_path):
    import time

    images = tmp_path / "in"
    _write_images(images, 1, seed=25)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "segformer_fast", "segment", str(images), "--model",
                             str(checkpoint), "--out", str(tmp_path / "out"), "--ray", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert result.returncode == 2
    assert result.stderr.strip() == "segformer-fast: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused"


def test_ctrl_c_under_ray_is_one_line_and_resumable(checkpoint, tmp_path):
    import signal
    import time

    images = tmp_path / "in"
    _write_images(images, 40, seed=26)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "segformer_fast", "segment", str(images), "--model", str(checkpoint), "--out",
               str(out), "--size", "128", "128", "--engine", "reference", "--quiet", "--ray", "--batch-size", "1"]
    import shutil
    import tempfile

    ray_dir = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp")  # its own session folder (a short path: Ray's sockets)
    env = dict(os.environ, RAY_TMPDIR=ray_dir)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            if (out / MANIFEST_NAME).is_file() and (out / MANIFEST_NAME).read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("segformer-fast: interrupted after ") and last.endswith(
        "of 40 images; run the same command again to resume")
    done = int(last.split("after ")[1].split(" of")[0])
    assert done >= 2 and len(read_manifest(out / MANIFEST_NAME)) == done
