"""What every benchmark script shares: timing, peak memory, the environment and results files (argument types are
``arguments``', text tables ``text_tables``').

The scripts in this folder run as ``python benchmarks/<name>.py``: Python puts the script's folder on sys.path, so
they ``import bench_common``; the package itself (``segformer_fast``) comes from the installation. Nothing here is
installed with the package. By default results go outside the repository (``RESULTS_DIR``); the files in
``benchmarks/results/`` are written there on purpose with ``--out``.

Timing (docs/DESIGN.md section 7): on CUDA each call sits between two CUDA events and is synchronized, so a latency is
one call's latency with an empty queue; on CPU ``time.perf_counter`` around each call. Kernel-sized calls on CUDA
use ``triton.testing.do_bench`` (median), which flushes the L2 cache between calls.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from segformer_fast.core.fileio import atomic_write_text

#: Where results go unless ``--out`` says otherwise: outside the repository (``$SEGFORMER_FAST_RESULTS``, else
#: ~/.cache/segformer-fast/results), so a plain run (``make bench``) leaves the work tree clean. The files in
#: benchmarks/results/ are committed on purpose: write one there with ``--out benchmarks/results/<name>.json``.
RESULTS_DIR = Path(os.environ.get("SEGFORMER_FAST_RESULTS") or Path.home() / ".cache" / "segformer-fast" / "results")
#: The repository's folder of committed results.
COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


class RunnerUnavailable(Exception):
    """Raised by a runner factory or its callable when the runner cannot run here; the row is skipped."""


# --------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn()``: between two CUDA events (synchronized) on CUDA, wall clock on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_calls_ms(fn: Callable[[], object], device: torch.device, repeats: int, *, max_seconds: float = math.inf,
                  min_repeats: int = 1) -> list:
    """Milliseconds of each of up to ``repeats`` calls of ``fn()``; stops early once ``min_repeats`` calls are
    timed and ``max_seconds`` have passed since the first one began."""
    times_ms = []
    budget_start = time.perf_counter()
    for i in range(repeats):
        times_ms.append(time_call_ms(fn, device))
        if i + 1 >= min_repeats and time.perf_counter() - budget_start > max_seconds:
            break
    return times_ms


def median_ms(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeats`` timed calls of ``fn()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(time_calls_ms(fn, device, repeats))


def do_bench_ms(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()`` on CUDA by ``triton.testing.do_bench`` (warm-up and timing budgets in ms)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def do_bench_cudagraph_ms(fn: Callable[[], object], *, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` on CUDA replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``):
    the launch overhead of the Python launcher is out of the time, as in the engine's own graphs."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of ``values`` (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, return cached blocks, so one measurement's leftovers do not weigh on the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------- peak memory


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated (weights and inputs included), or on CPU the increase
    of the process's resident high-water mark over the block (Linux ``/proc/self/clear_refs`` resets the mark; the
    increase counts from the resident size at ``start``; None where the mark cannot be reset)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_hwm_increase"
        self._baseline = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._baseline = None
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
        except OSError:
            return
        self._baseline = _proc_status_kib("VmRSS")

    def gigabytes(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        peak = _proc_status_kib("VmHWM")
        if self._baseline is None or peak is None:
            return None
        return max(0, peak - self._baseline) * 1024 / 1e9


# --------------------------------------------------------------------------------------------------- environment


def say(text: str = "", stream=None) -> None:
    """Print a line and flush; characters the stream's encoding lacks (a non-UTF-8 locale) are replaced, never fatal."""
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except LookupError:
        text = text.encode("ascii", "replace").decode("ascii")
    except UnicodeEncodeError:
        text = text.encode(encoding, "replace").decode(encoding, "replace")
    print(text, file=stream, flush=True)


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, its first line only, at most ``limit`` characters."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the processor or machine name elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """The device name for a file name: "nvidia-h200", "cpu-amd-epyc"."""
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)", "", name.lower())).strip("-") or device.type
    return slug if device.type == "cuda" or "cpu" in slug.split("-") else f"cpu-{slug}"


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def collect_versions(device: torch.device) -> dict:
    """python, torch, triton, transformers, segformer_fast versions (None when absent); cuda, cudnn, driver on CUDA."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - a broken triton install is "not importable" here
        versions["triton"] = None
    versions["transformers"] = _package_version("transformers")
    versions["segformer_fast"] = _package_version("segformer-fast")
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version()
        versions["driver"] = _nvidia_driver()
    return versions


def loadavg() -> list | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_is_busy(load: list | None) -> bool:
    """True when the 1-minute load average exceeds 3/4 of the CPUs: CPU timings then include contention."""
    return bool(load) and load[0] > (os.cpu_count() or 1) * 0.75


#: The instruction-set extensions that decide CPU speed here, as /proc/cpuinfo flags: wide vectors, the int8 / bf16
#: dot products and AMX tiles (oneDNN and the extension's kernels pick their paths from these).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "amx_fp16")


def cpu_isa() -> list:
    """The ISA_FLAGS this CPU has (from /proc/cpuinfo; torch.cpu.get_capabilities where that file is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in flags]
    except OSError:
        pass
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    capabilities = get_capabilities() if get_capabilities is not None else {}
    return [flag for flag in ISA_FLAGS if capabilities.get(flag)]


def environment(device: torch.device) -> dict:
    """The header of a results file: device, versions, date and host (with the CPU's model and ISA extensions,
    which decide CPU rows and the host side of GPU rows)."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": collect_versions(device),
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu": device_name(torch.device("cpu")), "cpu_isa": cpu_isa(),
                 "cpu_count": os.cpu_count(), "loadavg_at_start": loadavg()},
    }


# --------------------------------------------------------------------------------------------------- results files


def default_results_path(device: torch.device, prefix: str = "", root: Path | None = None) -> Path:
    """``<root>/<prefix><device slug>-<YYYY-MM-DD>.json``; root defaults to benchmarks/results/."""
    root = root if root is not None else RESULTS_DIR
    return root / f"{prefix}{device_slug(device)}-{datetime.date.today().isoformat()}.json"


def read_json(path: Path) -> object:
    """The parsed content of a JSON file; ValueError naming the file and the cause when it is missing, unreadable
    or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def write_json(path: Path, document: dict) -> None:
    """Write ``document`` as indented JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")


def choose_output(path: Path, document: dict, overwrite: bool) -> tuple:
    """(path to write, rows to keep from an existing file, message) for a results ``document`` with ``schema``,
    ``device`` and ``versions`` keys. An existing file of the same schema, device and versions is merged into (see
    :func:`merge_rows`); any other existing file is left alone and the first free name ``<stem>-2.json``, ``-3``,
    ... is used. ``overwrite`` replaces the file."""
    path = Path(path)
    if overwrite or not path.exists():
        return path, [], (f"overwriting {path}" if path.exists() else f"writing {path}")
    try:
        existing = read_json(path)
    except ValueError:
        existing = None  # not a results file: left alone, like any other
    schema = document["schema"]
    if isinstance(existing, dict) and existing.get("schema") == schema \
            and existing.get("device") == document["device"] and existing.get("versions") == document["versions"]:
        return path, list(existing.get("rows", [])), f"merging into existing {path} (same device and versions)"
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    why = "is not a results file of this schema" if not isinstance(existing, dict) or existing.get("schema") != schema \
        else "holds another device or other versions"
    return candidate, [], f"{path} {why}; writing {candidate} instead"


def merge_rows(kept: list, new: list, key: Callable[[dict], tuple]) -> list:
    """``kept`` rows whose ``key`` no new row has, then the ``new`` rows (a re-measured setting replaces the old)."""
    replaced = {key(row) for row in new}
    return [row for row in kept if key(row) not in replaced] + list(new)


__all__ = [
    "RESULTS_DIR", "COMMITTED_RESULTS_DIR", "RunnerUnavailable", "synchronize", "time_call_ms", "time_calls_ms",
    "median_ms", "do_bench_ms", "do_bench_cudagraph_ms", "percentile", "free_memory", "PeakMemory", "say", "one_line",
    "device_name", "device_slug", "collect_versions", "loadavg", "machine_is_busy", "ISA_FLAGS", "cpu_isa",
    "environment", "default_results_path", "read_json", "write_json", "choose_output", "merge_rows",
]
