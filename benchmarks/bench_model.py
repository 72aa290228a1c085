"""Model benchmark: images/s, latency and peak memory of SegFormer runners, side by side in one process.

    python benchmarks/bench_model.py                       # the default grid for the device (benchmarks/README.md)
    python benchmarks/bench_model.py --variants b0,b2 --resolutions ade cityscapes --batch 1 16 --dtype fp16
    python benchmarks/bench_model.py --quick --no-save     # tiny smoke run: b0, 64x64, 1 repeat

A *runner* is one way of executing the model (the engine, the eager reference, transformers eager,
``torch.compile`` in its modes, ONNX Runtime / OpenVINO / TensorRT on an ONNX export): a factory
``factory(variant, num_labels, device, dtype) -> fn(pixel_values) -> logits`` in the registry ``RUNNERS``
(:func:`register_runner`; the PyTorch ones are in bench_common/runners.py, the runtimes in
bench_common/runtimes.py). A factory or its callable raises :class:`RunnerUnavailable` to have its rows recorded
as skipped.

The protocol, the columns and the results file are described in benchmarks/README.md and docs/DESIGN.md section 7;
the shared parts (resolutions, the paper's numbers, timing, the table) live in bench_common. Results go to
``bench_common.RESULTS_DIR`` (outside the repository) unless ``--out`` names a file, rewritten after every row.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from segformer_fast.core import malloc_tuning
from segformer_fast.core.fileio import check_output_file
from segformer_fast.core.runtime import DTYPES, cpu_has_fast_bf16, resolve_device
from segformer_fast.model.config import VARIANTS

from bench_common import (
    DEFAULTS,
    MIN_REPEATS,
    PAPER_PROTOCOL,
    PAPER_V100,
    QUICK,
    QUICK_EXCLUDE,
    RESOLUTIONS,
    SCHEMA,
    PeakMemory,
    ReferenceLabels,
    Resolution,
    RunnerUnavailable,
    add_ratios,
    choose_output,
    counted_gmacs,
    default_results_path,
    device_argument,
    device_name,
    environment,
    flatten,
    format_table,
    list_argument,
    loadavg,
    machine_is_busy,
    make_inputs,
    measure,
    merge_rows,
    paper_setting,
    parse_resolution,
    positive_float,
    positive_int,
    progress_line,
    render_markdown,
    resolutions_type,
    row_base,
    row_key,
    run_setting_interleaved,
    run_setting_row_by_row,
    runners,
    runtimes,
    say,
    setting_key,
    write_json,
)

__all__ = [  # re-exported: other scripts and the tests reach them through bench_model too
    "PAPER_V100", "RESOLUTIONS", "SCHEMA", "Resolution", "RunnerUnavailable", "add_ratios", "counted_gmacs",
    "format_table", "make_inputs", "measure", "parse_resolution", "progress_line", "render_markdown", "row_key",
    "setting_key", "register_runner", "main",
]

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


register_runner("engine", runners.engine_runner)
register_runner("reference", runners.reference_runner)
register_runner("transformers", runners.transformers_runner)
#: Opt-in on CPU: compiling takes about 40 s per input shape on a 2-core machine (1.5 of the default run's 5 minutes
#: for two batch sizes on a quiet machine, more than 5 minutes in all on a busy one).
register_runner("compile", runners.compile_runner(None), default_on=("cuda",))
# reduce-overhead: CUDA graphs (cudagraph trees) around the compiled graph, the fair comparison with the engine's
# graphs at batch 1
register_runner("compile-ro", runners.compile_runner("reduce-overhead"), default_on=("cuda",))
# max-autotune: minutes of autotuning per shape on a GPU, so opt-in everywhere
register_runner("compile-max", runners.compile_runner("max-autotune"), default_on=())
# ONNX Runtime and OpenVINO on our ONNX export and on transformers' own (CPU default: the runtimes CPU users pick)
for _source in ("ours", "transformers"):
    register_runner(f"ort-{_source}", runtimes.ort_factory(_source), default_on=("cpu",))
    register_runner(f"openvino-{_source}", runtimes.openvino_factory(_source), default_on=("cpu",))
# int8 inside the fp32 row, calibrated on the row's first batch: ONNX Runtime static QDQ and OpenVINO + NNCF PTQ
register_runner("ort-ours-int8", runtimes.ort_int8_factory("ours"), default_on=("cpu",))
register_runner("openvino-ours-int8", runtimes.openvino_int8_factory("ours"), default_on=("cpu",))
# TensorRT fp16 on our ONNX export: what production GPU users deploy (skipped where tensorrt is not importable)
register_runner("trt-ours", runtimes.tensorrt_factory("ours"), default_on=("cuda",))


# --------------------------------------------------------------------------------------------------- settings


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser``."""
    variants = list_argument("variant", lambda: list(VARIANTS))
    dtypes = list_argument("dtype", lambda: list(DTYPES))
    runners = list_argument("runner", lambda: list(RUNNERS), normalize=str)
    parser.add_argument("--variants", nargs="+", type=variants, metavar="V",
                        help="b0..b5, comma or space separated (default: b0 on CPU, all on CUDA)")
    parser.add_argument("--resolutions", nargs="+", type=resolutions_type, metavar="R",
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
                             "(default 20); interleaved, a setting's rounds stop after this many seconds times its "
                             "number of runners")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="time a setting's runners in rounds, one call of each per round, the first rotating "
                             "(default on CPU); --no-interleave times each row on its own (default on CUDA)")
    parser.add_argument("--device", type=device_argument,
                        help="auto, cpu, cuda or cuda:N (default: auto, cuda when available)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: benchmarks/results/<device>-<YYYY-MM-DD>.json). An existing file "
                             "from the same device and versions gets the rows merged in; otherwise a new name is used")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file instead of merging")
    parser.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's protocol: IEEE fp32 (TF32 off), batch 1, timed through the full-resolution "
                             "labels on the host; B0/B4 at 512x512 and B5 at 640x640 (ADE20K), B0/B4/B5 at 1024x2048 "
                             "(Cityscapes), printed beside the paper's V100 FPS (--variants / --resolutions narrow it)")
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
    paper: bool = False  # the paper's protocol (see --paper): fp32 without TF32, batch 1, labels on the host
    interleave: bool = False  # timed calls in rounds over the setting's runners (bench_common.protocol)
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
    if getattr(args, "paper", False):
        defaults.update(PAPER_PROTOCOL)
        if args.batch or args.dtype:
            raise ValueError("--paper fixes batch 1 and fp32: leave out --batch and --dtype")
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
        paper=bool(getattr(args, "paper", False)),
        # CPU: a busy minute spreads over every runner; CUDA: events per call, large models alive one at a time
        interleave=args.interleave if getattr(args, "interleave", None) is not None else device.type == "cpu",
    )


# --------------------------------------------------------------------------------------------------- measuring


def _row_base(variant, resolution: Resolution, batch, dtype_name, runner, config: BenchConfig) -> dict:
    return row_base(variant, resolution, batch, dtype_name, runner, device=config.device, warmup=config.warmup,
                    paper=config.paper, interleaved=config.interleave)


def run_benchmark(config: BenchConfig, *, on_row: Callable[[dict], None] | None = None, log=None) -> list:
    """Run the grid variant x resolution x dtype x runner x batch, interleaved or row by row (``config.interleave``;
    bench_common.protocol). Returns the rows (in run order); ``on_row(row)`` is called after each row (the CLI saves
    the JSON there)."""
    log = log or say
    if config.device.type == "cuda" and config.device.index is not None:
        torch.cuda.set_device(config.device)  # CUDA events record on the current device's stream
    rows = []
    total = sum(len(config.batches_for(r)) for v in config.variants for r in config.resolutions
                if not config.paper or paper_setting(v, r)) * len(config.dtypes) * len(config.runners)
    reference = ReferenceLabels(config.device, config.seed)

    def emit(row):
        rows.append(row)
        log(f"[{len(rows)}/{total}] {progress_line(row)}")
        if on_row:
            on_row(row)

    for variant in config.variants:
        for resolution in config.resolutions:
            if config.paper and not paper_setting(variant, resolution):
                continue
            batches = config.batches_for(resolution)
            # the fp32 reference's labels first, so its model is never alive beside a runner's
            reference.compute(variant, resolution, batches, paper=config.paper)
            for dtype_name in config.dtypes:
                # interleaved rows finish together, after the rounds: a line as each runner is ready meanwhile
                run_setting = partial(run_setting_interleaved, log=log) if config.interleave else run_setting_row_by_row
                run_setting(RUNNERS, variant, resolution, dtype_name, batches, config, reference, emit)
    return rows


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
            "interleaved": config.interleave,
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
    if config.paper and config.device.type == "cuda":
        # IEEE fp32 for every runner, as the paper's V100 (which has no TF32) ran
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if config.device.type == "cpu":
        # the engine tunes glibc malloc when it is built; doing it first gives every runner the same allocator
        say(f"glibc malloc tuned for reuse (segformer_fast.core.malloc_tuning): {malloc_tuning.keep_freed_memory()}")
    say(f"device: {device_name(config.device)} ({config.device}); torch {torch.__version__}; "
        f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} CPUs)")
    say(f"grid: variants {','.join(config.variants)} · resolutions "
        f"{', '.join(f'{r.label} ({r.num_labels} labels)' for r in config.resolutions)} · batch "
        f"{' '.join(map(str, config.batches)) if config.batches else '1 and 16 (8 above 512x1024)'} · dtype "
        f"{' '.join(config.dtypes)} · runners {' '.join(config.runners)} · up to {config.repeats} repeats after "
        f"{config.warmup} warm-up calls, {config.max_seconds_per_row:g} s per row at most"
        + (" (x the runners, interleaved)" if config.interleave else " (row by row)"))
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

    new_rows: list = []

    def on_row(row):  # the file is rewritten after every row
        new_rows.append(row)
        if out_path is not None:
            document["rows"] = add_ratios(merge_rows(kept, new_rows, row_key))
            write_json(out_path, document)

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
    parser = argparse.ArgumentParser(prog=prog, description="Benchmark SegFormer runners (images/s, latency, peak "
                                     "memory) against transformers and the paper.")
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
