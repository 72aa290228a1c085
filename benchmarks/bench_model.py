"""Model benchmark: images/s, latency and peak memory of SegFormer runners, side by side in one process.

    python benchmarks/bench_model.py                       # the default grid for the device (benchmarks/README.md)
    python benchmarks/bench_model.py --variants b0,b2 --resolutions ade cityscapes --batch 1 16 --dtype fp16
    python benchmarks/bench_model.py --quick --no-save     # tiny smoke run: b0, 64x64, 1 repeat

A *runner* is one way of executing the model (the eager reference, transformers eager, ``torch.compile``, the
engine). Runners live in the registry ``RUNNERS``; add one with :func:`register_runner`. A runner factory is
called as ``factory(variant, num_labels, device, dtype)`` (``variant`` a string "b0".."b5", ``device`` a
``torch.device``, ``dtype`` a ``torch.dtype``) and returns a callable ``fn(pixel_values) -> logits`` with
``pixel_values`` (B, 3, H, W) on ``device`` in ``dtype`` and logits (B, num_labels, ceil(H/4), ceil(W/4)). The
benchmark loop does the warm-up; the factory should only build. A factory (or the callable, for failures that only
show on the first call, such as compilation) raises :class:`RunnerUnavailable` with a reason to have its rows
recorded as skipped. The callable may carry a ``notes`` attribute (str) that is copied into every row it produces
(e.g. "CUDA graphs").

Measurement (docs/DESIGN.md section 7): the same inputs (a fixed seed per shape) for every runner; the first call is
timed on its own (it includes compilation / autotuning), then ``warmup - 1`` more untimed calls, then up to
``repeats`` timed calls (stopping early, after at least 3, once ``max_seconds_per_row`` of timed calls have passed).
On CUDA each call is timed with CUDA events and synchronized, so latency is the per-batch latency with an empty
queue; on CPU with ``time.perf_counter``. images/s = batch / median latency. Everything runs under
``torch.inference_mode()``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the row (reset before it), which includes the
weights and the input. On CPU the increase of the process's resident set high-water mark over the row (Linux
``/proc/self/clear_refs`` resets the mark; the increase is measured from the resident size before the input is
made), so it excludes the weights; null where the mark cannot be reset.

Results: benchmarks/results/<device>-<YYYY-MM-DD>.json (schema ``SCHEMA``), rewritten after every row; an existing
file of the same device and versions gets the rows merged in (bench_common.choose_output).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import bench_runtimes
import torch

from segformer_fast.core import malloc_tuning
from segformer_fast.core.fileio import check_output_file
from segformer_fast.core.runtime import DTYPES, cpu_has_fast_bf16, is_out_of_memory, resolve_device
from segformer_fast.engine.engine import optimize
from segformer_fast.model.config import VARIANTS, SegformerConfig
from segformer_fast.model.segformer import Segformer

from bench_common import (
    PeakMemory,
    RunnerUnavailable,
    choose_output,
    console_table,
    default_results_path,
    device_argument,
    device_name,
    environment,
    flatten,
    format_number,
    free_memory,
    list_argument,
    loadavg,
    machine_is_busy,
    markdown_table,
    merge_rows,
    one_line,
    percentile,
    positive_float,
    positive_int,
    say,
    split_list,
    synchronize,
    time_calls_ms,
    write_json,
)

SCHEMA = "segformer-fast/bench-model/v1"

#: Named resolutions: (height, width, num_labels). "ade" and "cityscapes" are the paper's evaluation settings;
#: "ade640" is the paper's B5 ADE20K setting.
RESOLUTIONS = {
    "ade": (512, 512, 150),
    "ade640": (640, 640, 150),
    "cityscapes": (1024, 2048, 19),
}
DEFAULT_NUM_LABELS = 150

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
QUICK_EXCLUDE = {"compile", "compile-max", "ort-ours", "ort-transformers", "openvino-ours", "openvino-transformers"}
MIN_REPEATS = 3


# --------------------------------------------------------------------------------------------------- runners


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
    return Segformer.from_config(variant, num_labels=num_labels, seed=0).to(device=device, dtype=dtype)


def reference_runner(variant, num_labels, device, dtype):
    """The eager reference model (segformer_fast.model.segformer.Segformer)."""
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


def _compile_runner(mode):
    """A factory of torch.compile runners of the reference in ``mode`` (None: the default mode), static shapes."""

    def factory(variant, num_labels, device, dtype):
        import torch._dynamo

        # Dynamo's caches are per code object and shared by every Segformer instance: without a reset the
        # recompile limit is reached after a few settings and later rows would silently run eager.
        torch._dynamo.reset()
        try:
            compiled = torch.compile(_reference_model(variant, num_labels, device, dtype), mode=mode, dynamic=False)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler means "not available here"
            raise RunnerUnavailable(f"torch.compile failed on {device.type}: {one_line(err)}") from err

        def run(pixel_values):
            try:
                return compiled(pixel_values)
            except Exception as err:  # noqa: BLE001 - compilation happens on the first call of each shape
                if is_out_of_memory(err):
                    raise
                raise RunnerUnavailable(f"torch.compile failed on {device.type}: {one_line(err)}") from err

        run.notes = f"torch.compile(mode={mode or 'default'}, dynamic=False)"
        return run

    return factory


def engine_runner(variant, num_labels, device, dtype):
    """segformer_fast.optimize() of the reference: fused kernels, folded decoder, CUDA graphs on CUDA."""
    engine = optimize(_reference_model(variant, num_labels, device, torch.float32), dtype=dtype)
    engine.notes = f"engine ({engine.kernels} kernels{', CUDA graphs' if engine.use_cuda_graphs else ''})"
    return engine


register_runner("engine", engine_runner)
register_runner("reference", reference_runner)
register_runner("transformers", transformers_runner)
#: Opt-in on CPU: compiling takes about 40 s per input shape on a 2-core machine (1.5 of the default run's 5 minutes
#: for two batch sizes on a quiet machine, more than 5 minutes in all on a busy one).
register_runner("compile", _compile_runner(None), default_on=("cuda",))
# max-autotune: minutes of autotuning per shape on a GPU, so opt-in everywhere
register_runner("compile-max", _compile_runner("max-autotune"), default_on=())
# ONNX Runtime and OpenVINO on our ONNX export and on transformers' own (CPU default: the runtimes CPU users pick)
for _source in ("ours", "transformers"):
    register_runner(f"ort-{_source}", bench_runtimes.ort_factory(_source), default_on=("cpu",))
    register_runner(f"openvino-{_source}", bench_runtimes.openvino_factory(_source), default_on=("cpu",))


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


def _resolutions_type(text: str) -> list:
    try:
        return [parse_resolution(item) for item in split_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser``."""
    variants = list_argument("variant", lambda: list(VARIANTS))
    dtypes = list_argument("dtype", lambda: list(DTYPES))
    runners = list_argument("runner", lambda: list(RUNNERS), normalize=str)
    parser.add_argument("--variants", nargs="+", type=variants, metavar="V",
                        help="b0..b5, comma or space separated (default: b0 on CPU, all on CUDA)")
    parser.add_argument("--resolutions", nargs="+", type=_resolutions_type, metavar="R",
                        help="ade (512x512, 150 labels), ade640, cityscapes (1024x2048, 19 labels), HxW or HxW:LABELS "
                             "(default: ade on CPU; ade and cityscapes on CUDA)")
    parser.add_argument("--batch", nargs="+", type=positive_int, metavar="N",
                        help="batch sizes (default: 1 2 on CPU; 1 16 on CUDA, 1 8 above 512x1024 pixels)")
    parser.add_argument("--dtype", nargs="+", type=dtypes, metavar="D",
                        help="fp32, fp16, bf16 (default: fp32 on CPU; fp32 fp16 on CUDA)")
    parser.add_argument("--runners", nargs="+", type=runners, metavar="NAME",
                        help=f"registered runners: {', '.join(RUNNERS)} (default: every runner enabled by default on "
                             "the device; compile is opt-in on CPU)")
    parser.add_argument("--repeats", type=positive_int, help="timed calls per row, at most (default: 10 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=positive_int,
                        help="untimed calls before timing, the first included (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--max-seconds-per-row", type=positive_float,
                        help=f"stop timing a row after this many seconds once {MIN_REPEATS} calls are done "
                             "(default 20)")
    parser.add_argument("--device", type=device_argument,
                        help="auto, cpu, cuda or cuda:N (default: auto, cuda when available)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
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
    device = args.device or resolve_device("auto")
    defaults = dict(DEFAULTS[device.type])
    if args.quick:
        defaults.update(QUICK)
    variants = flatten(args.variants) or defaults["variants"]
    resolutions = flatten(args.resolutions) or [parse_resolution(r) for r in defaults["resolutions"]]
    batches = flatten(args.batch) if args.batch else defaults["batch"]
    dtypes = flatten(args.dtype) or defaults["dtype"]
    runners = flatten(args.runners) or [
        name for name in RUNNERS
        if device.type in RUNNER_DEFAULT_ON[name] and not (args.quick and name in QUICK_EXCLUDE)
    ]
    notes = []
    if device.type == "cpu" and not args.runners:
        opt_in = [name for name in RUNNERS if device.type not in RUNNER_DEFAULT_ON[name]]
        if opt_in:
            notes.append(f"opt-in on CPU, not run: {', '.join(opt_in)} "
                         f"(add e.g. --runners {' '.join(runners + opt_in)})")
    if device.type == "cpu" and "fp16" in dtypes:
        notes.append("fp16 on CPU is allowed but slow (few fp16 CPU kernels): not representative")
    if device.type == "cpu" and "bf16" in dtypes and not cpu_has_fast_bf16():
        notes.append("bf16 on this CPU is emulated (no AVX512-BF16 or AMX): slower than fp32")
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


# --------------------------------------------------------------------------------------------------- measuring


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
    synchronize(device)
    first_call_s = time.perf_counter() - start
    if tuple(out.shape) != tuple(expected_shape):
        raise RuntimeError(f"runner returned logits of shape {tuple(out.shape)}, expected {tuple(expected_shape)}")
    finite = bool(torch.isfinite(out).all())
    del out
    for _ in range(warmup - 1):
        fn(pixel_values)
    synchronize(device)
    times_ms = time_calls_ms(lambda: fn(pixel_values), device, repeats, max_seconds=max_seconds,
                             min_repeats=MIN_REPEATS)
    return {
        "latency_ms": statistics.median(times_ms),
        "latency_p90_ms": percentile(times_ms, 90),
        "latency_min_ms": min(times_ms),
        "first_call_s": first_call_s,
        "repeats": len(times_ms),
        "output_finite": finite,
    }


_GMAC_CACHE: dict = {}


def counted_gmacs(variant: str, resolution: Resolution) -> float | None:
    """Multiply-adds per image (GMAC) of the reference model, counted by torch's FlopCounterMode on the meta
    device (linear, conv and attention matmuls; FLOPs / 2). Matches the paper's GFLOPs to ~0.1 % at its settings."""
    key = (variant, resolution.height, resolution.width, resolution.num_labels)
    if key not in _GMAC_CACHE:
        try:
            from torch.utils.flop_counter import FlopCounterMode

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
                        build_failure = ("OOM" if is_out_of_memory(err) else "error", one_line(err))
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
                        free_memory(config.device)
                    del fn
                    free_memory(config.device)
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
        row["status"], row["reason"] = ("OOM" if is_out_of_memory(err) else "error"), one_line(err)
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


MEMORY_HEADERS = {"cuda_max_allocated": "peak alloc GB", "cpu_rss_hwm_increase": "peak RSS Δ GB"}
COLUMNS = ["variant", "resolution", "batch", "dtype", "runner", "images/s", "latency ms", "p90 ms", None,
           "× transformers", "1st call s", "TFLOP/s", "paper GFLOPs", "paper V100 FPS"]
#: Indices of the left-aligned (text) columns; numbers are right-aligned.
TEXT_COLUMNS = {0, 1, 3, 4}


def table_rows(rows: list) -> tuple:
    """(header, list of cell lists, footnotes) for the table; shared by the console and markdown renderers."""
    kinds = {row.get("peak_mem_kind") for row in rows}
    memory_header = MEMORY_HEADERS.get(kinds.pop(), "peak mem GB") if len(kinds) == 1 else "peak mem GB"
    header = [memory_header if c is None else c for c in COLUMNS]
    cells, footnotes = [], []
    for row in rows:
        ok = row.get("status") == "ok"
        status = row.get("status", "?")
        tflops = row.get("achieved_tflops")
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
            format_number(row.get("images_per_s")) if ok else status,
            format_number(row.get("latency_ms")) if ok else "—",
            format_number(row.get("latency_p90_ms")) if ok else "—",
            format_number(row.get("peak_mem_gb"), 2) if ok else "—",
            f"{ratio:.2f}" if ratio is not None else "—",
            format_number(row.get("first_call_s")) if ok else "—",
            format_number(tflops, 3 if (tflops or 0) < 1 else None) if ok else "—",
            format_number(row.get("paper_gflops"), 1),
            format_number(row.get("paper_v100_fps"), 1),
        ])
    return header, cells, footnotes


def format_table(rows: list) -> str:
    """Plain-text, column-aligned table of ``rows`` (text columns left-aligned, numbers right-aligned)."""
    header, cells, footnotes = table_rows(rows)
    return "\n".join([console_table(header, cells, TEXT_COLUMNS)] + [f"* {note}" for note in footnotes])


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
    out = [f"_{caption}_", "", markdown_table(header, cells, TEXT_COLUMNS)]
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
    """<root>/<device>-<YYYY-MM-DD>.json, root defaulting to benchmarks/results/."""
    return default_results_path(device, root=root)


def results_document(config: BenchConfig, rows: list, argv_text: str | None = None) -> dict:
    """The results JSON: schema, environment (device, versions, date, host), settings and rows."""
    return {
        "schema": SCHEMA,
        **environment(config.device),
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
            # every runner shares the process, so every CPU runner runs with the same malloc settings
            "malloc_tuned": malloc_tuning.keep_freed_memory() if config.device.type == "cpu" else None,
            "command": argv_text,
        },
        "rows": add_ratios(rows),
    }


# --------------------------------------------------------------------------------------------------- entry points


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``add_arguments`` options. Returns 0, or 1 if a row had an error
    (OOM and skipped rows are results, not errors)."""
    wall_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if config.device.type == "cpu":
        # the engine tunes glibc malloc when it is built; doing it first gives every runner the same allocator
        say(f"glibc malloc tuned for reuse (segformer_fast.core.malloc_tuning): {malloc_tuning.keep_freed_memory()}")
    say(f"device: {device_name(config.device)} ({config.device}); torch {torch.__version__}; "
        f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} CPUs)")
    say(f"grid: variants {','.join(config.variants)} · resolutions "
        f"{', '.join(f'{r.label} ({r.num_labels} labels)' for r in config.resolutions)} · batch "
        f"{' '.join(map(str, config.batches)) if config.batches else '1 and 16 (8 above 512x1024)'} · dtype "
        f"{' '.join(config.dtypes)} · runners {' '.join(config.runners)} · up to {config.repeats} repeats after "
        f"{config.warmup} warm-up calls, {config.max_seconds_per_row:g} s per row at most")
    load = loadavg()
    if config.device.type == "cpu" and machine_is_busy(load):
        config.notes.append(f"the machine is busy (1-min load average {load[0]:.1f} on {os.cpu_count()} CPUs): "
                            "CPU timings include contention with other processes")
    for note in config.notes:
        say(f"note: {note}")

    document = results_document(config, [], " ".join(sys.argv))
    out_path, kept, message = None, [], None
    if not args.no_save:
        requested = args.out if args.out is not None else default_out_path(config.device)
        check_output_file(requested, "--out results file")  # before the work, not after it
        out_path, kept, message = choose_output(Path(requested), document, args.overwrite)
        say(message)

    def save(rows_so_far):
        if out_path is not None:
            document["rows"] = add_ratios(merge_rows(kept, rows_so_far, row_key))
            write_json(out_path, document)

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
    try:
        return main_from_args(args)
    except ValueError as err:  # a bad option value or output path, found before the work: one line, exit 2
        print(f"bench_model.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
