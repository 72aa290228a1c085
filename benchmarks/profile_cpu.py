"""Per-op CPU profile of the engine's forward (kernels="torch"): where the time goes, by category, against the
FLOP and byte floors of each category and the measured GEMM ceiling of the machine.

    python benchmarks/profile_cpu.py                               # b0 b2 at 512x512, batch 1 4, fp32 bf16
    python benchmarks/profile_cpu.py --variants b0 --batch 1 --dtype fp32 --resolutions ade cityscapes
    python benchmarks/profile_cpu.py --quick --no-save             # smoke run: b0, 64x64, batch 1, fp32, 1 repeat

Per row (variant, resolution, batch, dtype): a random model (``Segformer(SegformerConfig(...))``) through
``optimize(model, dtype=...)``, ``warmup`` untimed calls of ``engine.logits``, the median latency of
``LATENCY_CALLS`` unprofiled calls, then ``repeats`` calls under ``torch.profiler`` with the input shapes recorded.
glibc malloc is tuned first (``segformer_fast.core.malloc_tuning``), as the engine does.

Categories: each profiler event's self CPU time goes to the category of the nearest op, the event itself or an
enclosing one, that names a category (``CATEGORY_OF_OP``; a convolution is "depthwise conv" when its weight has
one input channel per group, else "patch-embed conv"; the engine's depthwise conv carries Mix-FFN's GELU as a
oneDNN post-op, so on CPU "depthwise conv" includes that GELU); events under no such op are "other". So the copies that
``.contiguous()`` makes inside an op count as "copy", and the decoder's inner GEMMs (the classifier, and the stage-1
projection of ``fused_decode_tokens``) count as "gemm", leaving "decoder" the fused op's own upsample-sum-ReLU
work. Times are averaged per forward.

Floors, per forward, from the recorded input shapes and dtypes: GEMM FLOPs 2·M·N·K (counted at the GEMM ops
themselves: ``mkldnn::_linear_pointwise``, ``aten::addmm``, ``aten::mm``, ``aten::bmm``), convolution FLOPs
2·output elements·k·k·C_in/groups, attention FLOPs of SDPA 4·B·heads·N·Nkv·d, and bytes read + written for the
memory-bound ops (LayerNorm, GELU, softmax, copies: 2·elements·itemsize; the decoder: its four projected maps, or
the stage-1 tokens and three maps, and its logits). Achieved GFLOP/s and GB/s divide a floor by the category's time.

Ceilings, once per run: GFLOP/s of a size³ GEMM (2048 by default) on oneDNN (``cpu.linear`` with a packed
weight: ``mkldnn::_linear_pointwise``) and on ATen's default path (``F.linear``), in each profiled dtype (median of
``CEILING_CALLS`` calls after one warm-up). The floor of a row: every FLOP its forward counted (GEMMs, the decoder's
inner GEMMs, convolutions, attention) at the oneDNN ceiling of its dtype; ``floor_fraction`` = floor ÷ latency.

Results: benchmarks/results/profile-cpu-<YYYY-MM-DD>.json (schema ``SCHEMA``), rewritten atomically after each row.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from segformer_fast.core import malloc_tuning
from segformer_fast.core.fileio import check_output_file
from segformer_fast.core.runtime import DTYPES
from segformer_fast.engine.engine import optimize
from segformer_fast.model.config import VARIANTS, SegformerConfig
from segformer_fast.model.segformer import Segformer
from segformer_fast.ops import cpu

from bench_common import (
    RESULTS_DIR,
    Resolution,
    console_table,
    environment,
    flatten,
    format_number,
    list_argument,
    loadavg,
    machine_is_busy,
    make_inputs,
    median_ms,
    parse_resolution,
    positive_int,
    say,
    setting_fields,
    split_list,
    time_calls_ms,
    write_json,
)
from bench_common.op_profile import summarize, top_ops

SCHEMA = "segformer-fast/profile-cpu/v1"
CPU = torch.device("cpu")
PROFILE_DTYPES = ("fp32", "bf16")
DEFAULTS = {"variants": ["b0", "b2"], "resolutions": ["ade"], "batch": [1, 4], "dtype": list(PROFILE_DTYPES),
            "repeats": 5, "warmup": 2, "ceiling_size": 2048}
#: --quick: a smoke run (the ceiling GEMM shrunk too: its number then means nothing).
QUICK = {"variants": ["b0"], "resolutions": ["64x64"], "batch": [1], "dtype": ["fp32"], "repeats": 1, "warmup": 1,
         "ceiling_size": 256}
LATENCY_CALLS = 10
CEILING_CALLS = 3


# --------------------------------------------------------------------------------------------------- measuring


def _gflops_per_s(fn, size: int) -> float:
    return 2 * size**3 / (median_ms(fn, CPU, repeats=CEILING_CALLS, warmup=1) * 1e6)


@torch.no_grad()
def dtype_ceiling(dtype_name: str, size: int) -> dict:
    """GFLOP/s of a size x size x size GEMM in one dtype, on oneDNN (a packed weight) and on ATen's ``F.linear``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=generator).to(DTYPES[dtype_name])
    weight = torch.randn(size, size, generator=generator).to(DTYPES[dtype_name])
    packed = cpu.pack_linear_weight(weight)
    ceiling = {"aten_gflops_per_s": _gflops_per_s(lambda: F.linear(x, weight), size)}
    if packed.is_mkldnn:
        ceiling["onednn_gflops_per_s"] = _gflops_per_s(lambda: cpu.linear(x, packed), size)
    else:
        ceiling["onednn_gflops_per_s"] = None
        ceiling["reason"] = f"oneDNN has no {dtype_name} GEMM here (cpu.pack_linear_weight left it plain)"
    return ceiling


def gemm_ceilings(dtype_names: list, size: int) -> dict:
    """{"size", "calls", <dtype name>: :func:`dtype_ceiling`} for each profiled dtype."""
    return {"size": size, "calls": CEILING_CALLS, **{name: dtype_ceiling(name, size) for name in dtype_names}}


def profile_row(engine, variant: str, resolution: Resolution, batch: int, dtype_name: str, *, repeats: int,
                warmup: int) -> dict:
    """One row: warm-up, the median latency of ``LATENCY_CALLS`` plain calls, then ``repeats`` profiled calls."""
    pixel_values = make_inputs(batch, resolution, CPU, DTYPES[dtype_name])
    for _ in range(warmup):
        engine.logits(pixel_values)
    latency_ms = statistics.median(time_calls_ms(lambda: engine.logits(pixel_values), CPU, LATENCY_CALLS))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(repeats):
            engine.logits(pixel_values)
    categories = summarize(profiler.events(), repeats)
    return {
        **setting_fields(variant, resolution, batch, dtype_name),
        "repeats": repeats,
        "latency_ms": latency_ms,
        # the profiled ops' self time per forward: above latency_ms by the profiler's cost per op (large for the
        # many small ops of small inputs) and by time the thread waited for the CPU
        "profiled_ms": sum(category["ms"] for category in categories.values()),
        "categories": categories,
        "top_ops": top_ops(profiler, repeats),
    }


def add_floor(row: dict, ceilings: dict) -> dict:
    """The row's floor: the FLOPs its forward counted (every category's, the decoder's inner GEMMs included) at the
    measured oneDNN GEMM ceiling of its dtype, and the fraction of that floor its latency reaches
    (``floor_ms / latency_ms``; None without a ceiling)."""
    flops = sum(category["flops"] or 0 for category in row["categories"].values())
    ceiling = ceilings.get(row["dtype"], {}).get("onednn_gflops_per_s")
    floor_ms = flops / (ceiling * 1e6) if ceiling else None
    row.update(flops_per_forward=flops, floor_ms=floor_ms,
               floor_fraction=floor_ms / row["latency_ms"] if floor_ms is not None else None)
    return row


def format_row(row: dict, ceilings: dict) -> str:
    """The row's header line, its category table and the GEMM rate against the ceiling."""
    categories, total_ms = row["categories"], row["profiled_ms"]
    cells = [
        [name, format_number(category["ms"], 2),
         format_number(100 * category["ms"] / total_ms if total_ms else None, 1),
         format_number(category["gflops_per_s"]), format_number(category["gb_per_s"])]
        for name, category in categories.items() if category["ms"] > 0 or category["flops"] or category["bytes"]
    ]
    lines = [f"{row['variant']} {row['height']}x{row['width']} batch {row['batch']} {row['dtype']}: latency "
             f"{row['latency_ms']:.2f} ms (median of {LATENCY_CALLS} calls); profiled ops {total_ms:.2f} ms of self "
             f"CPU time per forward",
             console_table(["category", "ms", "%", "GFLOP/s", "GB/s"], cells, {0})]
    ceiling = ceilings.get(row["dtype"], {}).get("onednn_gflops_per_s")
    gemm_rate = categories["gemm"]["gflops_per_s"]
    if ceiling and gemm_rate:
        lines.append(f"gemm: {100 * gemm_rate / ceiling:.0f} % of the measured oneDNN {row['dtype']} GEMM ceiling "
                     f"({ceiling:.0f} GFLOP/s at {ceilings['size']}^3)")
    if row.get("floor_ms") is not None:
        lines.append(f"floor: {row['flops_per_forward'] / 1e9:.2f} GFLOP per forward at that ceiling = "
                     f"{row['floor_ms']:.2f} ms; floor ÷ latency {100 * row['floor_fraction']:.0f} %")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- entry points


def _resolutions_type(text: str) -> list:
    try:
        return [parse_resolution(item) for item in split_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="profile_cpu.py",
        description="Per-op CPU profile of the engine's forward by category, against FLOP / byte floors and the "
                    "measured GEMM ceiling.")
    variants = list_argument("variant", lambda: list(VARIANTS))
    dtypes = list_argument("dtype", lambda: list(PROFILE_DTYPES))
    parser.add_argument("--variants", nargs="+", type=variants, metavar="V", help="b0..b5 (default: b0 b2)")
    parser.add_argument("--resolutions", nargs="+", type=_resolutions_type, metavar="R",
                        help="ade (512x512, 150 labels), ade640, cityscapes (1024x2048, 19 labels), HxW or HxW:LABELS "
                             "(default: ade)")
    parser.add_argument("--batch", nargs="+", type=positive_int, metavar="N", help="batch sizes (default: 1 4)")
    parser.add_argument("--dtype", nargs="+", type=dtypes, metavar="D", help="fp32, bf16 (default: both)")
    parser.add_argument("--repeats", type=positive_int, help="profiled calls per row (default 5)")
    parser.add_argument("--warmup", type=positive_int, help="untimed calls before each row (default 2)")
    parser.add_argument("--ceiling-size", type=positive_int, help="M = N = K of the ceiling GEMM (default 2048)")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: benchmarks/results/profile-cpu-<YYYY-MM-DD>.json; replaced)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only, write no JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: b0, 64x64, batch 1, fp32, 1 repeat, a 256^3 ceiling (explicit options win)")
    return parser


def settings_from_args(args: argparse.Namespace) -> dict:
    """The run's settings: the defaults (and --quick's) filled in where an option is not given."""
    defaults = dict(DEFAULTS, **(QUICK if args.quick else {}))
    return {
        "variants": flatten(args.variants) or defaults["variants"],
        "resolutions": flatten(args.resolutions) or [parse_resolution(r) for r in defaults["resolutions"]],
        "batches": flatten(args.batch) or defaults["batch"],
        "dtypes": flatten(args.dtype) or defaults["dtype"],
        "repeats": args.repeats or defaults["repeats"],
        "warmup": args.warmup or defaults["warmup"],
        "ceiling_size": args.ceiling_size or defaults["ceiling_size"],
    }


def run(settings: dict, out_path: Path | None, command: str) -> int:
    """Profile every row of ``settings`` (:func:`settings_from_args`); write the JSON to ``out_path`` unless None."""
    wall_start = time.perf_counter()
    malloc_tuned = malloc_tuning.keep_freed_memory()
    notes = []
    load = loadavg()
    if machine_is_busy(load):
        notes.append(f"the machine is busy (1-min load average {load[0]:.1f} on {os.cpu_count()} CPUs): times "
                     "include contention with other processes")
    say(f"torch {torch.__version__}; {torch.get_num_threads()} threads of {os.cpu_count()} CPUs; glibc malloc tuned: "
        f"{malloc_tuned}")
    for note in notes:
        say(f"note: {note}")

    ceilings = gemm_ceilings(settings["dtypes"], settings["ceiling_size"])
    for name in settings["dtypes"]:
        onednn = ceilings[name]["onednn_gflops_per_s"]
        say(f"GEMM ceiling {name} at {settings['ceiling_size']}^3: oneDNN {format_number(onednn)} GFLOP/s, "
            f"F.linear {format_number(ceilings[name]['aten_gflops_per_s'])} GFLOP/s")
    document = {
        "schema": SCHEMA,
        **environment(CPU),
        "settings": {
            "variants": settings["variants"],
            "resolutions": [f"{r.height}x{r.width}:{r.num_labels}" for r in settings["resolutions"]],
            "batches": settings["batches"],
            "dtypes": settings["dtypes"],
            "repeats": settings["repeats"],
            "warmup": settings["warmup"],
            "latency_calls": LATENCY_CALLS,
            "threads": torch.get_num_threads(),
            "malloc_tuned": malloc_tuned,
            "notes": notes,
            "command": command,
        },
        "ceilings": ceilings,
        "rows": [],
    }
    for variant in settings["variants"]:
        for resolution in settings["resolutions"]:
            for dtype_name in settings["dtypes"]:
                model = Segformer(SegformerConfig(variant=variant, num_labels=resolution.num_labels)).eval()
                engine = optimize(model, dtype=DTYPES[dtype_name])
                for batch in settings["batches"]:
                    row = add_floor(profile_row(engine, variant, resolution, batch, dtype_name,
                                                repeats=settings["repeats"], warmup=settings["warmup"]), ceilings)
                    document["rows"].append(row)
                    say("")
                    say(format_row(row, ceilings))
                    if out_path is not None:
                        write_json(out_path, document)
                del model, engine
    if out_path is not None:
        say(f"\nresults: {out_path} ({len(document['rows'])} rows)")
    say(f"wall time: {time.perf_counter() - wall_start:.1f} s")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_path = None
    if not args.no_save:
        out_path = args.out or RESULTS_DIR / f"profile-cpu-{datetime.date.today().isoformat()}.json"
        try:
            check_output_file(out_path, "--out results file")  # before the work, not after it
        except ValueError as err:
            print(f"profile_cpu.py: {err}", file=sys.stderr)
            return 2
    return run(settings_from_args(args), out_path, shlex.join(["profile_cpu.py", *argv]))


if __name__ == "__main__":
    sys.exit(main())
