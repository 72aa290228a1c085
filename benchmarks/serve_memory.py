"""Memory per request in flight of ``segformer-fast serve``: a local server, then waves of concurrent requests with
large images, and the service's memory (the proportional set size, PSS, summed over every process it started:
the command's HTTP front, Ray's daemons and workers, the model replicas; shared pages counted once) sampled while
they run.

    python benchmarks/serve_memory.py                       # 16 x 4096x4096 single-colour PNGs at once
    python benchmarks/serve_memory.py --side 2048 --concurrency 8 --out /tmp/serve-memory.json

For each wave: the peak PSS over the idle service's, per request in flight and per pixel admitted (each request
holds its image's pixels plus its work size's, ``--max-pixels-in-flight`` in all; requests past that wait, so
the peak is bounded whatever the concurrency). Run it on a quiet machine: other processes do not change PSS, but
a slow machine stretches the waves. Nothing is written unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from segformer_fast import Segformer

from bench_common import positive_int
from bench_common.local_server import LocalServer, alive


def pss_bytes(pids) -> int:
    """Sum of the processes' PSS (``/proc/PID/smaps_rollup``), in bytes; processes that ended count 0."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def single_colour_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 120, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wave(server: LocalServer, body: bytes, concurrency: int, query: str, pids) -> dict:
    """``concurrency`` requests at once; the peak PSS while they run (sampled every 50 ms) and their statuses."""
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], pss_bytes(pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda _: server.call("POST", "/v1/segment?" + query, body,
                                                      {"Content-Type": "image/png"}, timeout_s=600)[0],
                                range(concurrency)))
    done.set()
    sampler.join()
    return {"statuses": answers, "seconds": time.perf_counter() - start, "peak_pss": peak[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=positive_int, default=4096, help="image side in pixels (default 4096)")
    parser.add_argument("--concurrency", type=positive_int, default=16, help="requests at once (default 16)")
    parser.add_argument("--waves", type=positive_int, default=2, help="waves of requests (default 2)")
    parser.add_argument("--output", default="labels", help="output kind asked for (default labels)")
    parser.add_argument("--server-args", default="", help="more options for the server, one string")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sf-serve-memory-"))
    Segformer.from_config("b0", num_labels=150, seed=0).save_pretrained(work / "b0")
    body = single_colour_png(args.side)
    server_args = ["--max-queue", str(max(64, args.concurrency)), *args.server_args.split()]
    with LocalServer(work / "b0", server_args) as server:
        model = json.loads(server.call("GET", "/v1/model")[2])
        budget = model["service"]["max_pixels_in_flight"]
        pids = list(alive(server.track()))
        server.call("POST", "/v1/segment?size=64", single_colour_png(64), {"Content-Type": "image/png"})
        idle = pss_bytes(pids)
        waves = [wave(server, body, args.concurrency, f"output={args.output}", pids) for _ in range(args.waves)]
        after = pss_bytes(pids)
    pixels_per_request = args.side * args.side + 512 * 512  # the image and its default work size
    admitted = min(args.concurrency, budget // pixels_per_request)
    peak = max(w["peak_pss"] for w in waves)
    result = {"side": args.side, "concurrency": args.concurrency, "png_bytes": len(body),
              "pixels_in_flight_budget": budget, "requests_admitted_at_once": admitted,
              "idle_pss_mb": idle / 2**20, "peak_pss_mb": peak / 2**20, "after_pss_mb": after / 2**20,
              "growth_per_request_in_flight_mb": (peak - idle) / 2**20 / max(1, admitted),
              "bytes_per_admitted_pixel": (peak - idle) / max(1, admitted * pixels_per_request),
              "waves": [{k: v for k, v in w.items() if k != "peak_pss"} | {"peak_pss_mb": w["peak_pss"] / 2**20}
                        for w in waves]}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
