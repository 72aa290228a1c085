"""Scaling benchmark: images/s of plain ``segformer-fast segment``, Ray Data with 1 and 2 workers, and torchrun with 1
and 2 processes, on the same generated folder of images.

    python benchmarks/bench_scaling.py                                  # 64 images, 512x512 runs, random B0
    python benchmarks/bench_scaling.py --images 8 --size 128 128 --out /tmp/smoke.json   # a smoke run

Each runner segments the whole folder into a fresh output folder; the time covers loading the checkpoint, building
(and verifying) the engine in every worker, and segmenting, reading and writing every image. Plain segment and Ray
run in this process (Ray on a local cluster started once beforehand: cluster start-up is not counted, as a job on
a running cluster does not pay it); torchrun runs as ``torchrun --standalone`` (its process start and torch import
are counted). On a CPU the cores are split evenly: each Ray worker gets ``cores / workers`` CPUs (its torch
threads), each torchrun process ``cores / processes`` OpenMP threads. Results go to
``benchmarks/results/scaling-<host cpu>-<date>.json``; measure on a quiet machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.cli import main as segment_cli
from segformer_fast.core.fileio import atomic_write_text
from segformer_fast.jobs import SegmentSettings, segment_with_ray

RESULTS = Path(__file__).resolve().parent / "results"


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` random RGB JPEGs of mixed sizes around 640x480 (each is resized to the run size)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        height, width = int(rng.integers(400, 560)), int(rng.integers(560, 720))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{index:05d}.jpg")


def time_plain(images: Path, model: Path, out: Path, size: list) -> float:
    start = time.perf_counter()
    code = segment_cli(["segment", str(images), "--model", str(model), "--out", str(out), "--size", *map(str, size),
                        "--device", "cpu", "--quiet"])
    if code != 0:
        raise RuntimeError(f"plain segment exited with {code}")
    return time.perf_counter() - start


def time_ray(images: Path, model: Path, out: Path, size: list, workers: int, cores: int, batch: int) -> float:
    settings = SegmentSettings(model=str(model), size=tuple(size), overlay=True)
    start = time.perf_counter()
    summary = segment_with_ray(images, out, settings, workers=workers, cpus_per_worker=max(1, cores // workers),
                               gpus_per_worker=0, batch_size=batch, progress=False)
    if summary.exit_code != 0 or summary.succeeded == 0:
        raise RuntimeError("Ray segment failed:\n" + summary.format())
    return time.perf_counter() - start


def time_torchrun(images: Path, model: Path, out: Path, size: list, processes: int, cores: int, batch: int) -> float:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // processes)))
    command = [str(torchrun), "--standalone", "--nproc-per-node", str(processes), "-m", "segformer_fast", "segment",
               str(images), "--model", str(model), "--out", str(out), "--size", *map(str, size), "--device", "cpu",
               "--batch-size", str(batch), "--quiet"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun exited with {result.returncode}:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def run(args) -> dict:
    import ray

    cores = args.cores or os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="segformer-fast-scaling-"))
    rows = []
    try:
        images, model = work / "images", work / "b0"
        make_images(images, args.images)
        if args.model:
            model = Path(args.model)
        else:
            Segformer.from_config("b0", num_labels=150, seed=0).save_pretrained(model)
        torch.set_num_threads(cores)

        def add(runner: str, parallel: int, seconds: float) -> None:
            rows.append({"runner": runner, "parallel": parallel, "images": args.images, "seconds": seconds,
                         "images_per_s": args.images / seconds})
            print(f"{runner:>9} x{parallel}: {seconds:7.2f} s  {args.images / seconds:7.2f} images/s", flush=True)

        add("segment", 1, time_plain(images, model, work / "out-plain", args.size))
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        try:
            for workers in args.workers:
                add("ray", workers, time_ray(images, model, work / f"out-ray-{workers}", args.size, workers, cores,
                                             args.batch_size))
        finally:
            ray.shutdown()
        for processes in args.processes:
            add("torchrun", processes, time_torchrun(images, model, work / f"out-torchrun-{processes}", args.size,
                                                     processes, cores, args.batch_size))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain = rows[0]["images_per_s"]
    for row in rows:
        row["vs_segment"] = row["images_per_s"] / plain
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cores": cores,
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "model": args.model or "random b0 (150 labels)",
        "size": args.size,
        "batch_size": args.batch_size,
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images in the generated folder (default 64)")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="run resolution (default 512 512)")
    parser.add_argument("--model", help="checkpoint to use (default: a random B0 with 150 labels)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts (default 1 2)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="torchrun process counts (default 1 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per worker batch (default 4)")
    parser.add_argument("--cores", type=int, help="CPU cores to split among workers (default: all)")
    parser.add_argument("--out", help="results file (default benchmarks/results/scaling-<cpu>-<date>.json)")
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / f"scaling-cpu-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
