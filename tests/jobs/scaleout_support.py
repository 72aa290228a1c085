"""What the scale-out tests share: writing images, comparing output trees and manifests, and running eval or a
torchrun job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segformer_fast.cli import main
from segformer_fast.jobs.manifest import MANIFEST_NAME

SIZE = ["--size", "64", "64"]


TORCHRUN = Path(sys.executable).with_name("torchrun")


def write_images(root: Path, count: int, seed: int) -> None:
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


def output_files(out: Path) -> list:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))


def assert_same_outputs(out: Path, expected: Path) -> None:
    names = output_files(expected)
    assert names and output_files(out) == names
    for name in names:
        got, want = Image.open(out / name), Image.open(expected / name)
        assert got.mode == want.mode, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def manifest_lines(out: Path) -> list:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def eval_report(argv, out: Path) -> dict:
    assert main(["eval", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def run_torchrun(args, cwd: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "segformer_fast", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
