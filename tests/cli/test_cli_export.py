"""``segformer-fast export``: every path checked before anything is written, SIGTERM during an export leaves no
temporary file, and the printed bounds are the real ones (a dynamic .pt2 program takes H, W >= 61)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from segformer_fast.cli import main
from segformer_fast.export.program import MIN_PROGRAM_SIDE


@pytest.mark.parametrize("second, message", [
    ("missing/second.pt2", "does not exist (export creates no folders)"),
    ("second.pt", "output path must end in .pt2"),
    ("taken/second.pt2", "is a file, not a folder"),
])
def test_both_paths_are_checked_before_anything_is_written(second, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    assert main(["export", "--model", "no-such-ckpt", "--onnx", "first.onnx", "--pt2", second]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-ckpt" not in err and len(err.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_a_missing_folder_is_refused_even_with_a_real_checkpoint(checkpoint, tmp_path, capsys):
    assert main(["export", "--model", str(checkpoint), "--onnx", str(tmp_path / "first.onnx"), "--pt2",
                 str(tmp_path / "missing" / "second.pt2")]) == 2
    assert "missing" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_an_export_leaves_no_temporary_file(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "segformer_fast", "export", "--model", str(checkpoint),
                                "--onnx", str(out / "m.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while not any(path.name.endswith(".tmp.onnx") for path in out.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the export never opened its temporary file"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "segformer-fast: terminated (SIGTERM)"
    assert list(out.iterdir()) == []


def test_a_dynamic_program_states_its_real_bounds(tmp_path, capsys):
    from segformer_fast import Segformer

    checkpoint = tmp_path / "ckpt"
    Segformer.from_config("b0", num_labels=3, seed=1).save_pretrained(checkpoint)
    assert main(["export", "--model", str(checkpoint), "--pt2", str(tmp_path / "m.pt2")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'm.pt2'} (fp32, any batch, H and W >= {MIN_PROGRAM_SIDE})" in printed
    assert "any batch and size" not in printed
