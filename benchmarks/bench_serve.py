"""Load benchmark of ``segformer-fast serve``: throughput and p50 / p99 latency at several concurrencies, batching
on and off, beside the engine's direct-call throughput measured in the same run; then a run of mostly good and
some malformed requests.

    python benchmarks/bench_serve.py                      # the measurement (a quiet machine: the load is recorded)
    python benchmarks/bench_serve.py --quick --no-save    # a smoke run (a minute or so)

Direct calls: ``engine.segment(image, size=...)`` one image at a time in this process (with all the machine's
threads), before any server starts; also one batch of 16 same-size images, whose images/s against batch 1 is the
batching gain a GPU can expect (a prediction: a CPU gains little from batching). Service: for each batching setting
(``--max-batch-size`` 16 and 1) a local server is started (``local_server.LocalServer``: 127.0.0.1 on a free port,
its own Ray), warmed up, and loaded by C client threads (each request a new connection, labels PNG out); a setting
ends after ``--requests`` requests or ``--seconds`` seconds, whichever comes first. Every loop is bounded in count
and time; only loopback is used. The malformed run sends ``--malformed-total`` requests at concurrency 16 of which
10 % are malformed (not an image, empty, truncated, pixel bomb, unknown parameter or output) and checks: every
malformed one gets a 4xx, no 5xx other than 503, and the model replica is the same process before and after.

Results: ``benchmarks/results/serve-<device>-<date>.json`` (``--out`` to choose, ``--no-save`` to skip), and a
markdown table for the README.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segformer_fast import Segformer, optimize

from bench_common import (
    choose_output,
    default_results_path,
    device_argument,
    environment,
    format_number,
    loadavg,
    machine_is_busy,
    markdown_table,
    merge_rows,
    percentile,
    positive_float,
    positive_int,
    write_json,
)
from bench_common.local_server import LocalServer

SCHEMA = "segformer-fast-serve-bench/2"
#: the service's stages (``Server-Timing``), then the client's view: its latency, and what of it is outside the
#: service's total (HTTP, connections, the client)
STAGES = ("read", "decode", "admit", "queue", "forward", "hop", "encode", "total", "client", "http")
#: what the issue asks of the service on a 2-core CPU
THROUGHPUT_FLOOR = 0.8
P99_OVER_P50_CEILING = 3.0


def make_images(count: int, size: tuple, seed: int = 0) -> list:
    """``count`` random RGB images around ``size`` (each is resized to the run size), as (PIL image, PNG bytes)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height = max(8, int(size[0] * rng.uniform(0.8, 1.25)))
        width = max(8, int(size[1] * rng.uniform(0.8, 1.25)))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        images.append((image, buffer.getvalue()))
    return images


def malformed_bodies() -> list:
    """(name, path suffix, body) of the malformed requests, each answered with a 4xx by a healthy server."""
    good = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(good, format="PNG")
    # noise does not compress: half of its PNG cuts the pixel data itself (a 16x16 black PNG cut at byte 60 still
    # holds all of its compressed pixels and decodes)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise, format="PNG")
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # 25 M pixels in a few kB
    return [("not an image", "", b"no image here" * 20), ("empty", "", b""),
            ("truncated", "", noise.getvalue()[:len(noise.getvalue()) // 2]), ("pixel bomb", "", bomb.getvalue()),
            ("unknown parameter", "&colour=red", good.getvalue()), ("unknown output", "&output=mask",
                                                                       good.getvalue())]


# ------------------------------------------------------------------------------------------------ direct calls
def direct_throughput(engine, images: list, size: tuple, requests: int, seconds: float) -> dict:
    """Images/s of ``engine.segment`` one image per call, and of one batch of 16 (after a warm-up of each)."""
    engine.segment(images[0][0], size=size)
    start, done = time.perf_counter(), 0
    while done < requests and time.perf_counter() - start < seconds:
        engine.segment(images[done % len(images)][0], size=size)
        done += 1
    single = done / (time.perf_counter() - start)
    batch = [images[i % len(images)][0] for i in range(16)]
    engine.segment(batch, size=size)
    start, rounds = time.perf_counter(), 0
    while rounds < max(1, requests // 16) and time.perf_counter() - start < seconds:
        engine.segment(batch, size=size)
        rounds += 1
    return {"images_per_s": single, "batch16_images_per_s": 16 * rounds / (time.perf_counter() - start),
            "requests": done}


# ------------------------------------------------------------------------------------------------ load
def load(server: LocalServer, jobs: list, concurrency: int, seconds: float, timeout_s: float = 120.0) -> dict:
    """Send ``jobs`` [(query, body)] from ``concurrency`` threads, until all are sent or ``seconds`` passed.
    Returns the statuses, latencies (ms) of the 200s, batch sizes and the wall time."""
    lock = threading.Lock()
    position = iter(range(len(jobs)))
    results = []
    deadline = time.perf_counter() + seconds

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                index = next(position, None)
            if index is None:
                return
            query, body = jobs[index]
            begin = time.perf_counter()
            try:
                status, headers, _ = server.call("POST", "/v1/segment?" + query, body,
                                                 {"Content-Type": "application/octet-stream"}, timeout_s=timeout_s)
            except OSError as error:
                status, headers = f"connection error: {type(error).__name__}", {}
            elapsed = (time.perf_counter() - begin) * 1e3
            with lock:
                results.append((index, status, elapsed, int(headers.get("x-batch-size", 0) or 0),
                                stage_timings(headers.get("server-timing", ""))))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return {"results": results, "seconds": time.perf_counter() - start}


def stage_timings(header: str) -> dict:
    """The service's ``Server-Timing`` header: {stage: ms} (read, decode, admit, queue, forward, hop, encode,
    total; see ``serve.pipeline``)."""
    stages = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name and duration:
            stages[name] = float(duration)
    return stages


def breakdown(results: list) -> dict:
    """Mean ms per stage over the answered requests, plus ``client`` (the latency the client saw) and ``http`` (the
    client's latency outside the service's total: the HTTP front, connection setup, the client itself)."""
    answered = [(latency, stages) for _, status, latency, _, stages in results if status == 200 and stages]
    if not answered:
        return {}
    names = sorted({name for _, stages in answered for name in stages}, key=STAGES.index)
    means = {name: statistics.fmean(stages.get(name, 0.0) for _, stages in answered) for name in names}
    means["client"] = statistics.fmean(latency for latency, _ in answered)
    means["http"] = means["client"] - means.get("total", 0.0)
    return means


def measure(server: LocalServer, images: list, size: tuple, concurrency: int, requests: int, seconds: float) -> dict:
    query = f"size={size[0]}x{size[1]}"
    load(server, [(query, images[i % len(images)][1]) for i in range(concurrency * 2)], concurrency, seconds)  # warm
    run = load(server, [(query, images[i % len(images)][1]) for i in range(requests)], concurrency, seconds)
    ok = [latency for _, status, latency, _, _ in run["results"] if status == 200]
    batches = [batch for _, status, _, batch, _ in run["results"] if status == 200]
    statuses: dict = {}
    for _, status, _, _, _ in run["results"]:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "concurrency": concurrency, "requests": len(run["results"]), "ok": len(ok), "statuses": statuses,
        "seconds": run["seconds"], "images_per_s": len(ok) / run["seconds"] if run["seconds"] > 0 else None,
        "p50_ms": statistics.median(ok) if ok else None, "p99_ms": percentile(ok, 99) if ok else None,
        "mean_batch": statistics.fmean(batches) if batches else None,
        "stages_ms": breakdown(run["results"]),
    }


def malformed_run(server: LocalServer, images: list, size: tuple, total: int, seconds: float) -> dict:
    """``total`` requests at concurrency 16, every tenth malformed: statuses by kind, and whether the replica
    survived (the same model replica process before and after)."""
    bad = malformed_bodies()
    query = f"size={size[0]}x{size[1]}"
    jobs, kinds = [], []
    for index in range(total):
        if index % 10 == 9:
            name, suffix, body = bad[(index // 10) % len(bad)]
            jobs.append((query + suffix, body))
            kinds.append(name)
        else:
            jobs.append((query, images[index % len(images)][1]))
            kinds.append("good")
    replicas_before = server.find("SegmentModel")
    run = load(server, jobs, 16, seconds)
    replicas_after = server.find("SegmentModel")
    by_kind: dict = {}
    server_errors = []
    for index, status, _, _, _ in run["results"]:
        counts = by_kind.setdefault(kinds[index], {})
        counts[str(status)] = counts.get(str(status), 0) + 1
        if not isinstance(status, int) or (status >= 500 and status != 503):
            server_errors.append(status)
    malformed_ok = all(status.startswith("4") for kind, counts in by_kind.items() if kind != "good"
                       for status in counts)
    return {"requests": len(run["results"]), "malformed": sum(kind != "good" for kind in kinds[:len(run["results"])]),
            "statuses_by_kind": by_kind, "server_errors_other_than_503": len(server_errors),
            "malformed_all_4xx": malformed_ok, "replica_survived": replicas_before == replicas_after,
            "seconds": run["seconds"]}


# ------------------------------------------------------------------------------------------------ the run
def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sf-bench-serve-"))
    size = tuple(args.size)
    model_path = Path(args.model) if args.model else work / "b0"
    if not args.model:
        Segformer.from_config("b0", num_labels=150, seed=0).save_pretrained(model_path)
    images = make_images(args.images, size)
    load_at_start = loadavg()
    if machine_is_busy(load_at_start):
        print(f"warning: the machine is busy (load {load_at_start}); the numbers include contention",
              file=sys.stderr)

    torch.set_num_threads(os.cpu_count() or 1)
    engine = optimize(Segformer.from_pretrained(model_path).to(args.device))
    direct = direct_throughput(engine, images, size, args.requests, args.seconds)
    del engine
    print(f"direct engine.segment: {direct['images_per_s']:.2f} images/s one at a time, "
          f"{direct['batch16_images_per_s']:.2f} images/s in a batch of 16", flush=True)

    rows, malformed = [], None
    for batch_size in args.batch_sizes:
        server_args = ["--max-batch-size", str(batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
                       "--replicas", str(args.replicas), "--device", str(args.device),
                       "--max-queue", str(max(64, 2 * max(args.concurrency)))]
        with LocalServer(model_path, server_args, start_timeout_s=args.start_timeout) as server:
            for concurrency in args.concurrency:
                row = measure(server, images, size, concurrency, args.requests, args.seconds)
                row.update(batching="on" if batch_size > 1 else "off", max_batch_size=batch_size,
                           vs_direct=(row["images_per_s"] / direct["images_per_s"]) if row["images_per_s"] else None)
                rows.append(row)
                print(f"batching {row['batching']:>3} (max {batch_size:>2}), concurrency {concurrency:>2}: "
                      f"{format_number(row['images_per_s'])} images/s ({format_number(row['vs_direct'])} x direct), "
                      f"p50 {format_number(row['p50_ms'])} ms, p99 {format_number(row['p99_ms'])} ms, mean batch "
                      f"{format_number(row['mean_batch'])}, statuses {row['statuses']}", flush=True)
            if malformed is None and args.malformed_total:
                malformed = malformed_run(server, images, size, args.malformed_total, args.seconds * 4)
                print(f"malformed run: {malformed['requests']} requests ({malformed['malformed']} malformed): "
                      f"{malformed['server_errors_other_than_503']} 5xx other than 503, malformed all 4xx: "
                      f"{malformed['malformed_all_4xx']}, replica survived: {malformed['replica_survived']}",
                      flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"direct": direct, "rows": rows, "malformed": malformed, "loadavg_at_start": load_at_start,
            "loadavg_at_end": loadavg()}


def checks(result: dict) -> list:
    """The issue's bounds, as lines saying what the run shows (measured, never asserted)."""
    lines = []
    direct = result["direct"]["images_per_s"]
    for row in result["rows"]:
        if row["concurrency"] == 16 and row["batching"] == "on" and row["images_per_s"]:
            ratio = row["images_per_s"] / direct
            lines.append(f"concurrency 16 throughput {ratio:.2f} x direct calls "
                         f"({'meets' if ratio >= THROUGHPUT_FLOOR else 'misses'} >= {THROUGHPUT_FLOOR})")
        if row["concurrency"] == 4 and row["batching"] == "on" and row["p50_ms"]:
            ratio = row["p99_ms"] / row["p50_ms"]
            lines.append(f"concurrency 4 p99 / p50 = {ratio:.2f} "
                         f"({'meets' if ratio <= P99_OVER_P50_CEILING else 'misses'} <= {P99_OVER_P50_CEILING})")
    gain = result["direct"]["batch16_images_per_s"] / direct
    lines.append(f"engine batch 16 / batch 1 throughput here: {gain:.2f} x (a prediction of the batching gain on a "
                 "GPU is this ratio measured there; not measured by this run unless --device cuda)")
    return lines


def table(result: dict) -> str:
    cells = [[row["batching"], str(row["max_batch_size"]), str(row["concurrency"]), format_number(row["images_per_s"]),
              format_number(row["vs_direct"]), format_number(row["p50_ms"]), format_number(row["p99_ms"]),
              format_number(row["mean_batch"])] for row in result["rows"]]
    header = ["batching", "max batch", "concurrency", "images/s", "x direct", "p50 ms", "p99 ms", "mean batch"]
    return markdown_table(header, cells, {0})


def stage_table(result: dict) -> str:
    """Where a request's time goes, mean ms per stage for each row (the service's Server-Timing)."""
    header = ["batching", "concurrency", *STAGES]
    cells = [[row["batching"], str(row["concurrency"]),
              *(format_number(row.get("stages_ms", {}).get(name)) for name in STAGES)] for row in result["rows"]]
    return markdown_table(header, cells, {0})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: a random B0 with 150 labels)")
    parser.add_argument("--size", type=positive_int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="run resolution (default 512 512); images are generated around it")
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 16],
                        help="client threads (default 1 4 16)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[16, 1],
                        help="--max-batch-size of each server started (default 16 1: batching on and off)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="the servers' --batch-wait-ms (default 10)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="model replicas (default 1)")
    parser.add_argument("--requests", type=positive_int, default=200,
                        help="requests per setting, and direct calls (default 200)")
    parser.add_argument("--seconds", type=positive_float, default=60.0,
                        help="most seconds per setting (default 60)")
    parser.add_argument("--malformed-total", type=int, default=1000,
                        help="requests of the malformed run, 10 %% malformed (default 1000; 0 skips it)")
    parser.add_argument("--images", type=positive_int, default=16, help="distinct images sent (default 16)")
    parser.add_argument("--start-timeout", type=positive_float, default=300.0, help="seconds a server may take to "
                        "start (default 300)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64 x 64, concurrency 1 and 4, batching on only, few requests")
    parser.add_argument("--out", help="results file (default benchmarks/results/serve-<device>-<date>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results file instead of merging")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.concurrency, args.batch_sizes = [64, 64], [1, 4], [4]
        args.requests, args.seconds, args.malformed_total, args.images = 12, 15.0, 20, 4
    if args.malformed_total < 0:
        parser.error("--malformed-total must be >= 0")

    result = run(args)
    print("\n" + table(result))
    print("\nmean ms per stage (read: body; decode: header, pixels, resize; admit: waiting for pixels; queue: in the "
          "replica before its forward; forward: preprocess, forward, upsample + argmax; hop: Ray's routing and "
          "transfers; encode: the output; total: in the service; http: the client's latency outside it)\n")
    print(stage_table(result))
    for line in checks(result):
        print(line)
    if args.no_save:
        return 0
    document = {"schema": SCHEMA, **environment(args.device), "quick": args.quick,
                "settings": {"size": args.size, "replicas": args.replicas, "batch_wait_ms": args.batch_wait_ms,
                             "requests": args.requests, "seconds": args.seconds},
                "direct": result["direct"], "malformed": result["malformed"],
                "loadavg": [result["loadavg_at_start"], result["loadavg_at_end"]], "checks": checks(result)}
    path = Path(args.out) if args.out else default_results_path(args.device, "serve-")
    path, kept, message = choose_output(path, document, args.overwrite)
    document["rows"] = merge_rows(kept, result["rows"], lambda row: (row["max_batch_size"], row["concurrency"]))
    write_json(path, document)
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
