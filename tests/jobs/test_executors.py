"""The same job on every executor: torchrun with 2 CPU processes (gloo) against the single-process command, the same
words from every executor, skip-existing and relative paths under Ray, refusals before any work, worker errors
and Ctrl-C in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from segformer_fast.cli import main
from segformer_fast.jobs.manifest import MANIFEST_NAME, read_manifest

from fake_datasets import make_ade20k
from scaleout_support import (
    SIZE,
    TORCHRUN,
    assert_same_outputs,
    eval_report,
    manifest_lines,
    run_torchrun,
    write_images,
)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_torchrun_segment_and_eval_equal_single_process(checkpoint, mixed_folder, single_process_output,
                                                         ade_dataset, tmp_path):
    out = tmp_path / "torchrun"
    result = run_torchrun(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(out), *SIZE,
                        "--device", "cpu", "--batch-size", "3", "--quiet"], tmp_path)
    assert result.returncode != 0, "the broken inputs must make the exit code non-zero"
    assert result.stdout.count("segmented 18 of 20 images") == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_outputs(out, single_process_output)
    records = manifest_lines(out)
    assert len(records) == 20 and len({r["input"] for r in records}) == 20, "sharded without duplicates"
    assert {r["worker"].split()[1] for r in records} == {"0", "1"}, "both ranks did work"

    argv = ["--model", str(checkpoint), "--data", str(ade_dataset), "--format", "ade20k", *SIZE, "--device", "cpu",
            "--quiet"]
    single = eval_report(argv, tmp_path / "single.json")
    result = run_torchrun(["eval", *argv, "--out", str(tmp_path / "torchrun.json")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("mIoU") == 1, "rank 0 alone prints the summary"
    scaled = json.loads((tmp_path / "torchrun.json").read_text())
    assert scaled["counts"] == single["counts"] and scaled["per_class"] == single["per_class"]
    assert scaled["mIoU"] == single["mIoU"]


# ------------------------------------------------------------------------------------ the same job everywhere
def _special_folder(root: Path) -> Path:
    write_images(root, 3, seed=21)
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
        # the path as the arguments name it, the reason without a Python class name
        assert f"failed {images / 'broken.png'}: cannot read image: " in captured.err
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
    write_images(images, 4, seed=22)
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
    write_images(images, 2, seed=23)
    monkeypatch.chdir(checkpoint.parent)
    code = main(["segment", str(images), "--model", checkpoint.name, "--out", str(tmp_path / "out"), *SIZE,
                 "--quiet", "--ray"])
    assert code == 0, capsys.readouterr().err
    assert "segmented 2 of 2 images" in capsys.readouterr().out


def test_ray_refusals_before_any_work(ray_session, checkpoint, ade_dataset, tmp_path, capsys):
    images = tmp_path / "in"
    write_images(images, 2, seed=24)
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
    write_images(images, 1, seed=25)
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
    write_images(images, 40, seed=26)
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
