"""Model benchmark: images/s, latency and peak memory of SegFormer runners, side by side in one process.

A *runner* is one way of executing the model (the eager reference, transformers eager, ``torch.compile``, later
the engine). Runners live in the registry ``RUNNERS``; add one with :func:`register_runner`. A runner factory is
called as ``factory(variant, num_labels, device, dtype)`` (``variant`` a string "b0".."b5", ``device`` a
``torch.device``, ``dtype`` a ``torch.dtype``) and returns a callable ``fn(pixel_values) -> logits`` with
``pixel_values`` (B, 3, H, W) on ``device`` in ``dtype`` and logits (B, num_labels, ceil(H/4), ceil(W/4)). The
benchmark loop does the warm-up; the factory should only build. A factory (or the callable, for failures that only
show on the first call, such as compilation) raises :class:`RunnerUnavailable` with a reason to have its rows
recorded as skipped. The callable may carry a ``notes`` attribute (str) that is copied into every row it produces
(e.g. "CUDA graphs").

Measurement (DESIGN.md section 7): the same inputs (a fixed seed per shape) for every runner; the first call is
timed on its own (it includes compilation / autotuning), then ``warmup - 1`` more untimed calls, then up to
``repeats`` timed calls (stopping early, after at least 3, once ``max_seconds_per_row`` of timed calls have passed).
On CUDA each call is timed with CUDA events and synchronized, so latency is the per-batch latency with an empty
queue; on CPU with ``time.perf_counter``. images/s = batch / median latency. Everything runs under
``torch.inference_mode()``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the row (reset before it), which includes the
weights and the input. On CPU the increase of the process's resident set high-water mark over the row (Linux
``/proc/self/clear_refs`` resets the mark; the increase is measured from the resident size before the input is
made), so it excludes the weights; null where the mark cannot be reset.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import VARIANTS
from .fileio import atomic_write_text

SCHEMA = "segformer-fast/bench-model/v1"

#: Named resolutions: (height, width, num_labels). "ade" and "cityscapes" are the paper's evaluation settings;
#: "ade640" is the paper's B5 ADE20K setting.
RESOLUTIONS = {
    "ade": (512, 512, 150),
    "ade640": (640, 640, 150),
    "cityscapes": (1024, 2048, 19),
}
DEFAULT_NUM_LABELS = 150

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: The paper's numbers (arXiv 2105.15203, Tables 1 and 2 / Table 3 real-time rows; V100, fp32, batch 1, mmseg
#: tools/benchmark.py), keyed by (variant, height, width, num_labels): (GFLOPs per image, FPS or None). The paper's
#: "FLOPs" count multiply-adds. The B0 real-time rows are Cityscapes at short side 768 / 640 / 512.
PAPER_V100 = {
    ("b0", 512, 512, 150): (8.4, 50.5),
    ("b1", 512, 512, 150): (15.9, None),
    ("b2", 512, 512, 150): (62.4, None),
    ("b3", 512, 512, 150): (79.0, None),
    ("b4", 512, 512, 150): (95.7, 15.4),
    ("b5", 640, 640, 150): (183.3, 9.8),
    ("b0", 1024, 2048, 19): (125.5, 15.2),
    ("b1", 1024, 2048, 19): (243.7, None),
    ("b2", 1024, 2048, 19): (717.1, None),
    ("b3", 1024, 2048, 19): (962.9, None),
    ("b4", 1024, 2048, 19): (1240.6, 3.0),
    ("b5", 1024, 2048, 19): (1447.6, 2.5),
    ("b0", 768, 1536, 19): (51.7, 26.3),
    ("b0", 640, 1280, 19): (31.5, 37.1),
    ("b0", 512, 1024, 19): (17.7, 47.6),
}

#: Defaults per device type. "batch" None means batch 1 and a large batch that depends on the resolution.
DEFAULTS = {
    "cpu": {"variants": ["b0"], "resolutions": ["ade"], "batch": [1, 2], "dtype": ["fp32"], "repeats": 10,
            "warmup": 2, "max_seconds_per_row": 20.0},
    "cuda": {"variants": list(VARIANTS), "resolutions": ["ade", "cityscapes"], "batch": None,
             "dtype": ["fp32", "fp16"], "repeats": 50, "warmup": 10, "max_seconds_per_row": 20.0},
}
QUICK = {"variants": ["b0"], "resolutions": ["64x64"], "batch": [1], "dtype": ["fp32"], "repeats": 1, "warmup": 1}
#: Runners left out of --quick unless named with --runners (compilation alone takes about a minute on a CPU).
QUICK_EXCLUDE = {"compile"}
MIN_REPEATS = 3


# --------------------------------------------------------------------------------------------------- runners


class RunnerUnavailable(Exception):
    """Raised by a runner factory or its callable when the runner cannot run here; the row is skipped."""


RunnerFactory = Callable[[str, int, torch.device, torch.dtype], Callable[[torch.Tensor], torch.Tensor]]

#: name -> factory(variant, num_labels, device, dtype) -> fn(pixel_values) -> logits. Rows appear in this order.
RUNNERS: dict[str, RunnerFactory] = {}
#: name -> device types ("cpu", "cuda") on which the runner is part of the default run.
RUNNER_DEFAULT_ON: dict[str, tuple] = {}


def register_runner(name: str, factory: RunnerFactory, *, default_on=("cpu", "cuda"), replace: bool = False) -> None:
    """Add a runner to the registry. ``default_on``: device types where it runs without ``--runners`` naming it."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
        raise ValueError(f"runner name must be non-empty and use only letters, digits, '_', '-', '.'; got {name!r}")
    if name in RUNNERS and not replace:
        raise ValueError(f"runner {name!r} is already registered (pass replace=True to replace it)")
    if not callable(factory):
        raise TypeError(f"runner factory for {name!r} must be callable, got {type(factory).__name__}")
    RUNNERS[name] = factory
    RUNNER_DEFAULT_ON[name] = tuple(default_on)


def _reference_model(variant, num_labels, device, dtype):
    from .model import Segformer

    return Segformer.from_config(variant, num_labels=num_labels, seed=0).to(device=device, dtype=dtype)


def reference_runner(variant, num_labels, device, dtype):
    """The eager reference model (segformer_fast.model.Segformer)."""
    return _reference_model(variant, num_labels, device, dtype)


def transformers_runner(variant, num_labels, device, dtype):
    """transformers' SegformerForSemanticSegmentation, eager, with the reference's weights."""
    try:
        import transformers
    except ImportError as err:
        raise RunnerUnavailable(f"transformers is not importable ({err})") from None
    hf_model = _reference_model(variant, num_labels, torch.device("cpu"), torch.float32).to_transformers()
    hf_model = hf_model.to(device=device, dtype=dtype).eval()

    def run(pixel_values):
        return hf_model(pixel_values=pixel_values).logits

    run.notes = f"transformers {transformers.__version__} eager"
    return run


def compile_runner(variant, num_labels, device, dtype):
    """torch.compile of the reference: mode "max-autotune" on CUDA, the default mode elsewhere; static shapes."""
    import torch._dynamo

    # Dynamo's caches are per code object and shared by every Segformer instance: without a reset the recompile
    # limit is reached after a few settings and later rows would silently run eager.
    torch._dynamo.reset()
    mode = "max-autotune" if device.type == "cuda" else None
    try:
        compiled = torch.compile(_reference_model(variant, num_labels, device, dtype), mode=mode, dynamic=False)
    except Exception as err:  # noqa: BLE001 - any failure of the compiler means "not available here"
        raise RunnerUnavailable(f"torch.compile failed on {device.type}: {_one_line(err)}") from err

    def run(pixel_values):
        try:
            return compiled(pixel_values)
        except Exception as err:  # noqa: BLE001 - compilation happens on the first call of each shape
            if _is_oom(err):
                raise
            raise RunnerUnavailable(f"torch.compile failed on {device.type}: {_one_line(err)}") from err

    run.notes = f"torch.compile(mode={mode or 'default'}, dynamic=False)"
    return run


def engine_runner(variant, num_labels, device, dtype):
    """segformer_fast.optimize() of the reference: fused kernels, folded decoder, CUDA graphs on CUDA."""
    from .engine import optimize

    engine = optimize(_reference_model(variant, num_labels, device, torch.float32), dtype=dtype)
    engine.notes = f"engine ({engine.kernels} kernels{', CUDA graphs' if engine.use_cuda_graphs else ''})"
    return engine


register_runner("engine", engine_runner)
register_runner("reference", reference_runner)
register_runner("transformers", transformers_runner)
#: Opt-in on CPU: compiling takes about 40 s per input shape on a 2-core machine (1.5 of the default run's 5 minutes
#: for two batch sizes on a quiet machine, more than 5 minutes in all on a busy one).
register_runner("compile", compile_runner, default_on=("cuda",))


# --------------------------------------------------------------------------------------------------- settings


@dataclass
class Resolution:
    name: str
    height: int
    width: int
    num_labels: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}"


def parse_resolution(spec: str) -> Resolution:
    """Parse "ade", "ade640", "cityscapes", "HxW" (150 labels) or "HxW:K" (K labels); ValueError otherwise."""
    key = spec.strip().lower()
    if key in RESOLUTIONS:
        return Resolution(key, *RESOLUTIONS[key])
    match = re.fullmatch(r"(\d+)x(\d+)(?::(\d+))?", key)
    if not match:
        named = ", ".join(f"{k} ({h}x{w}, {n} labels)" for k, (h, w, n) in RESOLUTIONS.items())
        raise ValueError(
            f"unknown resolution {spec!r}; valid: {named}, or HxW (e.g. 768x1536) or HxW:LABELS (e.g. 768x1536:19)"
        )
    height, width = int(match.group(1)), int(match.group(2))
    num_labels = int(match.group(3)) if match.group(3) else DEFAULT_NUM_LABELS
    if height < 1 or width < 1 or num_labels < 1:
        raise ValueError(f"resolution {spec!r}: height, width and labels must be positive")
    return Resolution(key, height, width, num_labels)


def _split(values) -> list:
    out = []
    for value in values if isinstance(values, (list, tuple)) else [values]:
        out.extend(part for part in str(value).split(",") if part.strip())
    return [part.strip() for part in out]


def _list_type(kind: str, valid: Callable[[], list], normalize=str.lower):
    def parse(text: str) -> list:
        items = [normalize(item) for item in _split(text)]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list; valid: {', '.join(valid())}")
        for item in items:
            if item not in valid():
                raise argparse.ArgumentTypeError(f"unknown {kind} {item!r}; valid: {', '.join(valid())}")
        return items

    parse.__name__ = kind
    return parse


def _resolutions_type(text: str) -> list:
    try:
        return [parse_resolution(item) for item in _split(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _device_type(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; valid: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return device


def _flatten(groups) -> list | None:
    if groups is None:
        return None
    out = []
    for group in groups:
        for item in group if isinstance(group, list) else [group]:
            if item not in out:
                out.append(item)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by benchmarks/bench_model.py and `segformer-fast bench`)."""
    variants = _list_type("variant", lambda: list(VARIANTS))
    dtypes = _list_type("dtype", lambda: list(DTYPES))
    runners = _list_type("runner", lambda: list(RUNNERS), normalize=str)
    parser.add_argument("--variants", nargs="+", type=variants, metavar="V",
                        help="b0..b5, comma or space separated (default: b0 on CPU, all on CUDA)")
    parser.add_argument("--resolutions", nargs="+", type=_resolutions_type, metavar="R",
                        help="ade (512x512, 150 labels), ade640, cityscapes (1024x2048, 19 labels), HxW or HxW:LABELS "
                             "(default: ade on CPU; ade and cityscapes on CUDA)")
    parser.add_argument("--batch", nargs="+", type=_positive_int, metavar="N",
                        help="batch sizes (default: 1 2 on CPU; 1 16 on CUDA, 1 8 above 512x1024 pixels)")
    parser.add_argument("--dtype", nargs="+", type=dtypes, metavar="D",
                        help="fp32, fp16, bf16 (default: fp32 on CPU; fp32 fp16 on CUDA)")
    parser.add_argument("--runners", nargs="+", type=runners, metavar="NAME",
                        help=f"registered runners: {', '.join(RUNNERS)} (default: every runner enabled by default on "
                             "the device; compile is opt-in on CPU)")
    parser.add_argument("--repeats", type=_positive_int, help="timed calls per row, at most (default: 10 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=_positive_int,
                        help="untimed calls before timing, the first included (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--max-seconds-per-row", type=_positive_float,
                        help=f"stop timing a row after this many seconds once {MIN_REPEATS} calls are done "
                             "(default 20)")
    parser.add_argument("--device", type=_device_type, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: benchmarks/results/<device>-<YYYY-MM-DD>.json). An existing file "
                             "from the same device and versions gets the rows merged in; otherwise a new name is used")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file instead of merging")
    parser.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run: b0, 64x64, batch 1, fp32, 1 repeat, 1 warm-up (explicit options win)")
    return parser


@dataclass
class BenchConfig:
    device: torch.device
    variants: list
    resolutions: list
    batches: list | None  # None: batch 1 and the device default large batch per resolution
    dtypes: list
    runners: list
    repeats: int
    warmup: int
    max_seconds_per_row: float
    seed: int = 0
    notes: list = field(default_factory=list)

    def batches_for(self, resolution: Resolution) -> list:
        if self.batches is not None:
            return self.batches
        return [1, 16 if resolution.height * resolution.width <= 512 * 1024 else 8]


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Resolve the defaults (device dependent, --quick) into a BenchConfig."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = dict(DEFAULTS[device.type])
    if args.quick:
        defaults.update(QUICK)
    variants = _flatten(args.variants) or defaults["variants"]
    resolutions = _flatten(args.resolutions) or [parse_resolution(r) for r in defaults["resolutions"]]
    batches = _flatten(args.batch) if args.batch else defaults["batch"]
    dtypes = _flatten(args.dtype) or defaults["dtype"]
    runners = _flatten(args.runners) or [
        name for name in RUNNERS
        if device.type in RUNNER_DEFAULT_ON[name] and not (args.quick and name in QUICK_EXCLUDE)
    ]
    notes = []
    if device.type == "cpu" and not args.runners:
        opt_in = [name for name in RUNNERS if device.type not in RUNNER_DEFAULT_ON[name]]
        if opt_in:
            notes.append(f"opt-in on CPU, not run: {', '.join(opt_in)} "
                         f"(add e.g. --runners {' '.join(runners + opt_in)})")
    if device.type == "cpu" and any(d in ("fp16", "bf16") for d in dtypes):
        notes.append("fp16/bf16 on CPU are allowed but slow (few reduced-precision CPU kernels): not representative")
    return BenchConfig(
        device=device,
        variants=variants,
        resolutions=resolutions,
        batches=batches,
        dtypes=dtypes,
        runners=runners,
        repeats=args.repeats or defaults["repeats"],
        warmup=args.warmup or defaults["warmup"],
        max_seconds_per_row=args.max_seconds_per_row or defaults["max_seconds_per_row"],
        notes=notes,
    )


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


def device_name(device: torch.device) -> str:
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
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)", "", name.lower())).strip("-") or device.type
    return slug if device.type == "cuda" or "cpu" in slug.split("-") else f"cpu-{slug}"


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect_versions(device: torch.device) -> dict:
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


def _loadavg() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --------------------------------------------------------------------------------------------------- measuring


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in message.lower() or "can't allocate memory" in message or isinstance(err, MemoryError)
    )


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
    """Peak memory over a block: CUDA max_memory_allocated, or the CPU resident high-water mark increase."""

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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch: int, resolution: Resolution, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The same pixel values for every runner of a setting (normal noise, like normalized images)."""
    generator = torch.Generator().manual_seed(
        seed * 1_000_003 + batch * 7919 + resolution.height * 31 + resolution.width
    )
    pixel_values = torch.randn(batch, 3, resolution.height, resolution.width, generator=generator)
    return pixel_values.to(device=device, dtype=dtype)


def measure(fn, pixel_values, *, device, warmup: int, repeats: int, max_seconds: float, expected_shape) -> dict:
    """Time ``fn(pixel_values)``; see the module docstring for the protocol."""
    start = time.perf_counter()
    out = fn(pixel_values)
    _synchronize(device)
    first_call_s = time.perf_counter() - start
    if tuple(out.shape) != tuple(expected_shape):
        raise RuntimeError(f"runner returned logits of shape {tuple(out.shape)}, expected {tuple(expected_shape)}")
    finite = bool(torch.isfinite(out).all())
    del out
    for _ in range(warmup - 1):
        fn(pixel_values)
    _synchronize(device)
    times_ms = []
    budget_start = time.perf_counter()
    for i in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(pixel_values)
            end.record()
            end.synchronize()
            times_ms.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(pixel_values)
            times_ms.append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= MIN_REPEATS and time.perf_counter() - budget_start > max_seconds:
            break
    return {
        "latency_ms": statistics.median(times_ms),
        "latency_p90_ms": _percentile(times_ms, 90),
        "latency_min_ms": min(times_ms),
        "first_call_s": first_call_s,
        "repeats": len(times_ms),
        "output_finite": finite,
    }


def _percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


_GMAC_CACHE: dict = {}


def counted_gmacs(variant: str, resolution: Resolution) -> float | None:
    """Multiply-adds per image (GMAC) of the reference model, counted by torch's FlopCounterMode on the meta
    device (linear, conv and attention matmuls; FLOPs / 2). Matches the paper's GFLOPs to ~0.1 % at its settings."""
    key = (variant, resolution.height, resolution.width, resolution.num_labels)
    if key not in _GMAC_CACHE:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            from .config import SegformerConfig
            from .model import Segformer

            with torch.device("meta"):
                model = Segformer(SegformerConfig(variant=variant, num_labels=resolution.num_labels))
                pixel_values = torch.empty(1, 3, resolution.height, resolution.width)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(pixel_values)
            _GMAC_CACHE[key] = counter.get_total_flops() / 2e9
        except Exception:  # noqa: BLE001 - the count is informative only
            _GMAC_CACHE[key] = None
    return _GMAC_CACHE[key]


def _row_base(variant, resolution: Resolution, batch, dtype_name, runner, config: BenchConfig) -> dict:
    paper_gflops, paper_fps = PAPER_V100.get((variant, resolution.height, resolution.width, resolution.num_labels),
                                             (None, None))
    return {
        "variant": variant,
        "height": resolution.height,
        "width": resolution.width,
        "num_labels": resolution.num_labels,
        "batch": batch,
        "dtype": dtype_name,
        "runner": runner,
        "status": "ok",
        "reason": None,
        "images_per_s": None,
        "latency_ms": None,
        "latency_p90_ms": None,
        "latency_min_ms": None,
        "first_call_s": None,
        "peak_mem_gb": None,
        "peak_mem_kind": "cuda_max_allocated" if config.device.type == "cuda" else "cpu_rss_hwm_increase",
        "gmacs_per_image": counted_gmacs(variant, resolution),
        "achieved_tflops": None,
        "paper_gflops": paper_gflops,
        "paper_v100_fps": paper_fps,
        "ratio_to_transformers": None,
        "repeats": None,
        "warmup": config.warmup,
        "threads": torch.get_num_threads(),
        "output_finite": None,
        "notes": None,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_benchmark(config: BenchConfig, *, on_row: Callable[[dict], None] | None = None, log=None) -> list:
    """Run the grid variant x resolution x dtype x runner x batch; one model is alive at a time. Returns the rows
    (in run order); ``on_row(row)`` is called after each row (the CLI saves the JSON there)."""
    log = log or say
    if config.device.type == "cuda" and config.device.index is not None:
        torch.cuda.set_device(config.device)  # CUDA events record on the current device's stream
    rows = []
    total = sum(len(config.batches_for(r)) for r in config.resolutions) * len(config.variants) * len(config.dtypes) \
        * len(config.runners)
    for variant in config.variants:
        for resolution in config.resolutions:
            for dtype_name in config.dtypes:
                dtype = DTYPES[dtype_name]
                batches = config.batches_for(resolution)
                for runner in config.runners:
                    fn, build_failure, build_s = None, None, None
                    try:
                        t0 = time.perf_counter()
                        fn = RUNNERS[runner](variant, resolution.num_labels, config.device, dtype)
                        build_s = time.perf_counter() - t0
                    except RunnerUnavailable as err:
                        build_failure = ("skipped", str(err))
                    except Exception as err:  # noqa: BLE001 - one broken row never stops the run
                        build_failure = ("OOM" if _is_oom(err) else "error", _one_line(err))
                    for batch in batches:
                        row = _row_base(variant, resolution, batch, dtype_name, runner, config)
                        row["build_s"] = build_s
                        if build_failure:
                            row["status"], row["reason"] = build_failure
                        else:
                            row["notes"] = getattr(fn, "notes", None)
                            _run_row(fn, row, resolution, batch, dtype, config)
                            if row["status"] == "skipped":
                                build_failure = (row["status"], row["reason"])  # e.g. compile failed: skip the rest
                        rows.append(row)
                        log(f"[{len(rows)}/{total}] {progress_line(row)}")
                        if on_row:
                            on_row(row)
                        _free(config.device)
                    del fn
                    _free(config.device)
    return rows


def _run_row(fn, row: dict, resolution: Resolution, batch: int, dtype, config: BenchConfig) -> None:
    device = config.device
    memory = PeakMemory(device)
    pixel_values = None
    try:
        memory.start()
        pixel_values = make_inputs(batch, resolution, device, dtype, config.seed)
        expected = (batch, resolution.num_labels, math.ceil(resolution.height / 4), math.ceil(resolution.width / 4))
        with torch.inference_mode():
            result = measure(fn, pixel_values, device=device, warmup=config.warmup, repeats=config.repeats,
                             max_seconds=config.max_seconds_per_row, expected_shape=expected)
        row.update(result)
        row["peak_mem_gb"] = memory.gigabytes()
        row["images_per_s"] = batch / (result["latency_ms"] / 1e3)
        if row["gmacs_per_image"]:
            row["achieved_tflops"] = 2 * row["gmacs_per_image"] * row["images_per_s"] / 1e3
    except RunnerUnavailable as err:
        row["status"], row["reason"] = "skipped", str(err)
    except Exception as err:  # noqa: BLE001 - OOM and other failures are recorded, the run goes on
        row["status"], row["reason"] = ("OOM" if _is_oom(err) else "error"), _one_line(err)
    finally:
        del pixel_values


def setting_key(row: dict) -> tuple:
    return (row["variant"], row["height"], row["width"], row.get("num_labels"), row["batch"], row["dtype"])


def row_key(row: dict) -> tuple:
    return setting_key(row) + (row["runner"],)


def add_ratios(rows: list) -> list:
    """Set each row's ratio_to_transformers = images/s ÷ transformers' images/s in the same setting (or None)."""
    baseline = {setting_key(r): r["images_per_s"] for r in rows
                if r["runner"] == "transformers" and r.get("status") == "ok" and r.get("images_per_s")}
    for row in rows:
        base = baseline.get(setting_key(row))
        ok = row.get("status") == "ok" and row.get("images_per_s")
        row["ratio_to_transformers"] = row["images_per_s"] / base if ok and base else None
    return rows


# --------------------------------------------------------------------------------------------------- output


def _num(value, digits=None) -> str:
    if value is None:
        return "—"
    if digits is not None:
        return f"{value:.{digits}f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


MEMORY_HEADERS = {"cuda_max_allocated": "peak alloc GB", "cpu_rss_hwm_increase": "peak RSS Δ GB"}
COLUMNS = ["variant", "resolution", "batch", "dtype", "runner", "images/s", "latency ms", "p90 ms", None,
           "× transformers", "1st call s", "TFLOP/s", "paper GFLOPs", "paper V100 FPS"]


def table_rows(rows: list) -> tuple:
    """(header, list of cell lists, footnotes) for the table; shared by the console and markdown renderers."""
    kinds = {row.get("peak_mem_kind") for row in rows}
    memory_header = MEMORY_HEADERS.get(kinds.pop(), "peak mem GB") if len(kinds) == 1 else "peak mem GB"
    header = [memory_header if c is None else c for c in COLUMNS]
    cells, footnotes = [], []
    for row in rows:
        ok = row.get("status") == "ok"
        status = row.get("status", "?")
        setting = (f"{row['variant'].upper()} {row['height']}x{row['width']} batch {row['batch']} {row['dtype']} "
                   f"{row['runner']}")
        if not ok:
            footnotes.append(f"{setting}: {status}" + (f" ({row['reason']})" if row.get("reason") else ""))
        elif row.get("output_finite") is False:
            footnotes.append(f"{setting}: non-finite logits (overflow)")
        ratio = row.get("ratio_to_transformers")
        cells.append([
            row["variant"].upper(),
            f"{row['height']}x{row['width']}",
            str(row["batch"]),
            row["dtype"],
            row["runner"],
            _num(row.get("images_per_s")) if ok else status,
            _num(row.get("latency_ms")) if ok else "—",
            _num(row.get("latency_p90_ms")) if ok else "—",
            _num(row.get("peak_mem_gb"), 2) if ok else "—",
            f"{ratio:.2f}" if ratio is not None else "—",
            _num(row.get("first_call_s")) if ok else "—",
            _num(row.get("achieved_tflops"), 3 if (row.get("achieved_tflops") or 0) < 1 else None) if ok else "—",
            _num(row.get("paper_gflops"), 1),
            _num(row.get("paper_v100_fps"), 1),
        ])
    return header, cells, footnotes


def format_table(rows: list) -> str:
    """Plain-text, column-aligned table of ``rows`` (text columns left-aligned, numbers right-aligned)."""
    header, cells, footnotes = table_rows(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    left = {0, 1, 3, 4}

    def line(values):
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells]
    out += [f"* {note}" for note in footnotes]
    return "\n".join(out)


def render_markdown(results: dict) -> str:
    """A markdown table (with a caption naming device, versions, date and settings) of a results JSON object."""
    rows = add_ratios([dict(r) for r in results.get("rows", [])])
    header, cells, footnotes = table_rows(rows)
    versions = results.get("versions", {})
    settings = results.get("settings", {})
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "segformer_fast")
    caption = (f"{results.get('device', '?')} · {version_text} · {results.get('date', '?')} · "
               f"{settings.get('threads', '?')} torch threads · median of up to {settings.get('repeats', '?')} "
               f"repeats after {settings.get('warmup', '?')} warm-up calls")
    host = results.get("host") or {}
    load, cpus = host.get("loadavg_at_start"), host.get("cpu_count")
    if results.get("device_type") == "cpu" and load and cpus and load[0] > cpus * 0.75:
        caption += f" · busy machine (load average {load[0]:.1f} on {cpus} CPUs at the start)"
    out = [f"_{caption}_", "", "| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i in (0, 1, 3, 4) else "--:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    if footnotes:
        out.append("")
        out += [f"- {note}" for note in footnotes]
    return "\n".join(out) + "\n"


def progress_line(row: dict) -> str:
    setting = f"{row['variant']} {row['height']}x{row['width']} batch {row['batch']} {row['dtype']} {row['runner']}"
    if row["status"] != "ok":
        return f"{setting}: {row['status']}" + (f" ({row['reason']})" if row.get("reason") else "")
    memory = row.get("peak_mem_gb")
    memory_text = "—" if memory is None else f"{memory:.2f} GB"
    return (f"{setting}: {row['images_per_s']:.2f} img/s, {row['latency_ms']:.1f} ms median "
            f"(p90 {row['latency_p90_ms']:.1f}, {row['repeats']} repeats), peak mem {memory_text}, "
            f"1st call {row['first_call_s']:.2f} s" + ("" if row.get("output_finite", True) else ", NON-FINITE logits"))


# --------------------------------------------------------------------------------------------------- results file


def default_out_path(device: torch.device, root: Path | None = None) -> Path:
    root = root if root is not None else Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    return root / f"{device_slug(device)}-{datetime.date.today().isoformat()}.json"


def _comparable(existing: dict, results: dict) -> bool:
    return existing.get("schema") == SCHEMA and existing.get("device") == results["device"] \
        and existing.get("versions") == results["versions"]


def choose_output(path: Path, results: dict, overwrite: bool) -> tuple:
    """(path to write, rows to keep from an existing file, message). Existing results of the same device and
    versions are merged (rows of the same setting and runner are replaced by the new ones); otherwise the first
    free name ``<stem>-2.json``, ``-3``, ... is used so no other run is clobbered."""
    if overwrite or not path.exists():
        return path, [], (f"overwriting {path}" if path.exists() else f"writing {path}")
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = None
    if isinstance(existing, dict) and _comparable(existing, results):
        return path, list(existing.get("rows", [])), f"merging into existing {path} (same device and versions)"
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    why = "is not a results file of this schema" if not isinstance(existing, dict) or existing.get("schema") != SCHEMA \
        else "holds another device or other versions"
    return candidate, [], f"{path} {why}; writing {candidate} instead"


def merge_rows(kept: list, new: list) -> list:
    replaced = {row_key(r) for r in new}
    return [r for r in kept if row_key(r) not in replaced] + list(new)


def results_document(config: BenchConfig, rows: list, argv_text: str | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "device": device_name(config.device),
        "device_type": config.device.type,
        "versions": collect_versions(config.device),
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_at_start": _loadavg()},
        "settings": {
            "threads": torch.get_num_threads(),
            "repeats": config.repeats,
            "warmup": config.warmup,
            "max_seconds_per_row": config.max_seconds_per_row,
            "min_repeats": MIN_REPEATS,
            "timing": "cuda events, synchronized per call" if config.device.type == "cuda" else "time.perf_counter",
            "peak_mem": PeakMemory(config.device).kind,
            "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32 if config.device.type == "cuda" else None,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32 if config.device.type == "cuda" else None,
            "command": argv_text,
        },
        "rows": add_ratios(rows),
    }


def write_results(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document, indent=1, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------------------------- entry points


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``add_arguments`` options. Returns 0, or 1 if a row had an error
    (OOM and skipped rows are results, not errors)."""
    wall_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    say(f"device: {device_name(config.device)} ({config.device}); torch {torch.__version__}; "
        f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} CPUs)")
    say(f"grid: variants {','.join(config.variants)} · resolutions "
        f"{', '.join(f'{r.label} ({r.num_labels} labels)' for r in config.resolutions)} · batch "
        f"{' '.join(map(str, config.batches)) if config.batches else '1 and 16 (8 above 512x1024)'} · dtype "
        f"{' '.join(config.dtypes)} · runners {' '.join(config.runners)} · up to {config.repeats} repeats after "
        f"{config.warmup} warm-up calls, {config.max_seconds_per_row:g} s per row at most")
    load = _loadavg()
    if load and config.device.type == "cpu" and load[0] > (os.cpu_count() or 1) * 0.75:
        config.notes.append(f"the machine is busy (1-min load average {load[0]:.1f} on {os.cpu_count()} CPUs): "
                            "CPU timings include contention with other processes")
    for note in config.notes:
        say(f"note: {note}")

    document = results_document(config, [], " ".join(sys.argv))
    out_path, kept, message = None, [], None
    if not args.no_save:
        requested = args.out if args.out is not None else default_out_path(config.device)
        out_path, kept, message = choose_output(Path(requested), document, args.overwrite)
        say(message)

    def save(rows_so_far):
        if out_path is not None:
            document["rows"] = add_ratios(merge_rows(kept, rows_so_far))
            write_results(out_path, document)

    new_rows: list = []

    def on_row(row):
        new_rows.append(row)
        save(new_rows)

    try:
        run_benchmark(config, on_row=on_row)
    except KeyboardInterrupt:
        say(f"interrupted after {len(new_rows)} rows" + (f"; they are saved in {out_path}" if out_path else ""))
        return 130
    add_ratios(new_rows)
    say("")
    say(format_table(new_rows))
    for note in config.notes:
        say(f"note: {note}")
    if out_path is not None:
        say(f"results: {out_path} ({len(document['rows'])} rows, {len(new_rows)} from this run)")
    say(f"wall time: {time.perf_counter() - wall_start:.1f} s")
    return 1 if any(row["status"] == "error" for row in new_rows) else 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark SegFormer runners (images/s, latency, peak memory) against transformers and the paper.",
    )
    return add_arguments(parser)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return main_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
