"""How the model benchmark times its runners (docs/DESIGN.md section 7, benchmarks/README.md "How it measures").

Two protocols, both with the same first-call and warm-up stage per runner and batch:

- **interleaved** (the default on CPU): per setting (variant, resolution, batch, dtype) every runner does its first
  call (timed alone: ``first_call_s``) and its warm-up calls, its peak memory measured over that stage; then the
  timed calls run in rounds, each round calling every runner still running once, the round's first runner moving
  one place on each round, so a slow minute of a shared machine is spread over every runner instead of landing on
  one. The rounds stop after ``repeats`` rounds, or once ``MIN_REPEATS`` rounds are done and more than
  ``max_seconds_per_row`` x (the number of runners that entered the rounds) seconds have passed since the first
  round began. A runner that fails in a round is recorded (error, OOM or skipped) and leaves the rounds.
- **row by row** (``--no-interleave``; the default on CUDA, where each call is timed by CUDA events on an otherwise
  idle GPU and the models are large enough that one alive at a time matters): per runner and batch, the first
  call, the warm-up calls, then up to ``repeats`` timed calls, stopping once ``MIN_REPEATS`` are done and more
  than ``max_seconds_per_row`` seconds have passed.

After the timed calls each ok row gets its label agreement with the fp32 reference from one extra, untimed call
(bench_common.agreement).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from segformer_fast.core.runtime import DTYPES, is_out_of_memory

from .agreement import ReferenceLabels, label_agreement, output_labels
from .harness import (
    PeakMemory,
    RunnerUnavailable,
    free_memory,
    one_line,
    percentile,
    synchronize,
    time_call_ms,
    time_calls_ms,
)
from .model import MIN_REPEATS, Resolution, labels_on_host, make_inputs, row_base, row_precision


@dataclass
class BuiltRunner:
    """A runner built for one (variant, resolution, dtype): its callable, or why it cannot run."""

    name: str
    fn: Callable | None
    build_s: float | None
    failure: tuple | None  # (status, reason): of the build, or of a row that skips the runner's later batches


def failure_status(err: BaseException) -> tuple:
    """(status, reason) of a failed build or call: skipped (RunnerUnavailable), OOM or error."""
    if isinstance(err, RunnerUnavailable):
        return "skipped", str(err)
    return ("OOM" if is_out_of_memory(err) else "error"), one_line(err)


def build_runner(name: str, factory: Callable, variant: str, resolution: Resolution, dtype: torch.dtype,
                 device: torch.device) -> BuiltRunner:
    """Call the runner's factory, timing it; a failure is kept, never raised."""
    try:
        start = time.perf_counter()
        fn = factory(variant, resolution.num_labels, device, dtype)
        return BuiltRunner(name, fn, time.perf_counter() - start, None)
    except Exception as err:  # noqa: BLE001 - one broken runner never stops the run
        return BuiltRunner(name, None, None, failure_status(err))


def first_calls(fn, pixel_values, *, device, warmup: int, expected_shape) -> dict:
    """The first call timed alone (compilation, autotuning, quantization), its output's shape checked, then
    ``warmup - 1`` untimed calls. Returns ``first_call_s`` and ``output_finite``."""
    start = time.perf_counter()
    out = fn(pixel_values)
    synchronize(device)
    first_call_s = time.perf_counter() - start
    if tuple(out.shape) != tuple(expected_shape):
        raise RuntimeError(f"runner returned logits of shape {tuple(out.shape)}, expected {tuple(expected_shape)}")
    finite = bool(torch.isfinite(out).all()) if out.is_floating_point() else True
    del out
    for _ in range(warmup - 1):
        fn(pixel_values)
    synchronize(device)
    return {"first_call_s": first_call_s, "output_finite": finite}


def latency_summary(times_ms: list) -> dict:
    """Median, p90 and min of per-call milliseconds, and how many calls were timed."""
    return {"latency_ms": statistics.median(times_ms), "latency_p90_ms": percentile(times_ms, 90),
            "latency_min_ms": min(times_ms), "repeats": len(times_ms)}


def measure(fn, pixel_values, *, device, warmup: int, repeats: int, max_seconds: float, expected_shape) -> dict:
    """Row-by-row timing of ``fn(pixel_values)``: first call, warm-up, then up to ``repeats`` timed calls (see the
    module docstring)."""
    result = first_calls(fn, pixel_values, device=device, warmup=warmup, expected_shape=expected_shape)
    times_ms = time_calls_ms(lambda: fn(pixel_values), device, repeats, max_seconds=max_seconds,
                             min_repeats=MIN_REPEATS)
    return {**result, **latency_summary(times_ms)}


def expected_output_shape(batch: int, resolution: Resolution, paper: bool) -> tuple:
    """Logits (B, K, ceil(H/4), ceil(W/4)), or full-resolution labels (B, H, W) under the paper's protocol."""
    if paper:
        return (batch, resolution.height, resolution.width)
    return (batch, resolution.num_labels, math.ceil(resolution.height / 4), math.ceil(resolution.width / 4))


def timed_callable(built: BuiltRunner, paper: bool) -> Callable:
    """What is timed: the runner's callable, or under the paper's protocol its full-resolution labels on the host."""
    return labels_on_host(built.fn, engine_labels=built.name == "engine") if paper else built.fn


def _record_failure(row: dict, err: BaseException) -> None:
    row["status"], row["reason"] = failure_status(err)


def _finish_row(built: BuiltRunner, timed: Callable, row: dict, pixel_values, resolution: Resolution, batch: int,
                config, reference: ReferenceLabels) -> None:
    """After a row's timed calls: speed, the runner's own facts, the label agreement (one extra untimed call)."""
    row["images_per_s"] = batch / (row["latency_ms"] / 1e3)
    if row["gmacs_per_image"]:
        row["achieved_tflops"] = 2 * row["gmacs_per_image"] * row["images_per_s"] / 1e3
    with torch.inference_mode():
        facts = getattr(built.fn, "row_facts", None)
        if facts is not None:
            row.update(facts(pixel_values))
        reference_labels = reference.get(row["variant"], resolution, batch, paper=config.paper)
        row["label_agreement"] = None
        if reference_labels is not None:
            labels = output_labels(timed(pixel_values), paper=config.paper)
            row["label_agreement"] = label_agreement(labels, reference_labels)
    failure = reference.failure(row["variant"], resolution, batch, paper=config.paper)
    row["notes"] = getattr(built.fn, "notes", None)  # read last: a runner may say what its first call did
    if failure:
        row["notes"] = f"{row['notes'] or ''}; no label agreement: the fp32 reference failed ({failure})".lstrip("; ")


def measure_row_alone(built: BuiltRunner, row: dict, resolution: Resolution, batch: int, dtype: torch.dtype, config,
                      reference: ReferenceLabels) -> None:
    """Row by row: one runner and batch, its peak memory from before its input is made (input + activations).
    ``config`` is bench_model's BenchConfig (device, warmup, repeats, max_seconds_per_row, seed, paper)."""
    device = config.device
    memory = PeakMemory(device)
    pixel_values = None
    try:
        memory.start()
        pixel_values = make_inputs(batch, resolution, device, dtype, config.seed)
        timed = timed_callable(built, config.paper)
        row["precision"], row["tf32"] = row_precision(built.fn, row["dtype"], device)
        with torch.inference_mode():
            row.update(measure(timed, pixel_values, device=device, warmup=config.warmup, repeats=config.repeats,
                               max_seconds=config.max_seconds_per_row,
                               expected_shape=expected_output_shape(batch, resolution, config.paper)))
        row["peak_mem_gb"] = memory.gigabytes()
        _finish_row(built, timed, row, pixel_values, resolution, batch, config, reference)
    except Exception as err:  # noqa: BLE001 - OOM and other failures are recorded, the run goes on
        _record_failure(row, err)
        row["notes"] = getattr(built.fn, "notes", None)
    finally:
        del pixel_values


def measure_setting_interleaved(runners: list, rows: list, resolution: Resolution, batch: int, dtype: torch.dtype,
                                config, reference: ReferenceLabels, log: Callable[[str], None] | None = None) -> None:
    """Interleaved: every runner of one setting on one input (B, 3, H, W); ``rows[i]`` is ``runners[i]``'s row,
    filled in place (rows whose status is not "ok" are left as they are). See the module docstring. ``log(line)``
    gets a line as each runner's first calls are done (the rows themselves finish together, after the rounds)."""
    device = config.device
    try:
        pixel_values = make_inputs(batch, resolution, device, dtype, config.seed)
    except Exception as err:  # noqa: BLE001 - no input (out of memory, say): every runner's row says why
        for row in rows:
            if row["status"] == "ok":
                _record_failure(row, err)
        return
    expected = expected_output_shape(batch, resolution, config.paper)
    timed = {}
    for index, (built, row) in enumerate(zip(runners, rows)):
        if row["status"] != "ok":
            continue
        # each runner's first call + warm-up alone: its peak memory (activations, and whatever the first call
        # builds; the input was made before) and its first-call time are its own
        memory = PeakMemory(device)
        try:
            timed[index] = timed_callable(built, config.paper)
            row["precision"], row["tf32"] = row_precision(built.fn, row["dtype"], device)
            memory.start()
            with torch.inference_mode():
                row.update(first_calls(timed[index], pixel_values, device=device, warmup=config.warmup,
                                       expected_shape=expected))
            row["peak_mem_gb"] = memory.gigabytes()
        except Exception as err:  # noqa: BLE001 - recorded, the other runners go on
            _record_failure(row, err)
            row["notes"] = getattr(built.fn, "notes", None)
        if log is not None:
            done = (f"ready (first call {row['first_call_s']:.2f} s)" if row["status"] == "ok" else
                    f"{row['status']} ({row.get('reason') or ''})")
            log(f"  {row['variant']} {row['height']}x{row['width']} batch {batch} {row['dtype']} {built.name}: {done}"
                f"{'; timing every runner of the setting in rounds next' if index == len(runners) - 1 else ''}")

    running = [index for index, row in enumerate(rows) if row["status"] == "ok"]
    times_ms = {index: [] for index in running}
    budget_s = config.max_seconds_per_row * len(running)
    start = time.perf_counter()
    with torch.inference_mode():
        for round_index in range(config.repeats):
            if not running:
                break
            shift = round_index % len(running)
            for index in running[shift:] + running[:shift]:  # the round's first runner moves one place each round
                try:
                    times_ms[index].append(time_call_ms(functools.partial(timed[index], pixel_values), device))
                except Exception as err:  # noqa: BLE001 - the runner leaves the rounds, the others go on
                    _record_failure(rows[index], err)
                    rows[index]["notes"] = getattr(runners[index].fn, "notes", None)
                    running.remove(index)
            if round_index + 1 >= MIN_REPEATS and time.perf_counter() - start > budget_s:
                break

    for index in running:
        rows[index].update(latency_summary(times_ms[index]))
        try:
            _finish_row(runners[index], timed[index], rows[index], pixel_values, resolution, batch, config, reference)
        except Exception as err:  # noqa: BLE001 - e.g. the agreement call failed: recorded
            _record_failure(rows[index], err)
    del pixel_values


def _new_row(built: BuiltRunner, variant: str, resolution: Resolution, batch: int, dtype_name: str, config) -> dict:
    row = row_base(variant, resolution, batch, dtype_name, built.name, device=config.device, warmup=config.warmup,
                   paper=config.paper, interleaved=config.interleave)
    row["build_s"] = built.build_s
    if built.failure:
        row["status"], row["reason"] = built.failure
    return row


def _build(factories: dict, name: str, variant: str, resolution: Resolution, dtype_name: str, config) -> BuiltRunner:
    return build_runner(name, factories[name], variant, resolution, DTYPES[dtype_name], config.device)


def run_setting_row_by_row(factories: dict, variant: str, resolution: Resolution, dtype_name: str, batches: list,
                           config, reference: ReferenceLabels, emit: Callable[[dict], None]) -> None:
    """Row by row: one runner at a time (one model alive), each of its batches timed on its own. ``factories``:
    runner name -> factory; ``config``: bench_model's BenchConfig; ``emit(row)`` gets each finished row."""
    for name in config.runners:
        built = _build(factories, name, variant, resolution, dtype_name, config)
        for batch in batches:
            row = _new_row(built, variant, resolution, batch, dtype_name, config)
            if row["status"] == "ok":
                measure_row_alone(built, row, resolution, batch, DTYPES[dtype_name], config, reference)
                if row["status"] == "skipped":
                    built.failure = (row["status"], row["reason"])  # e.g. compile failed: skip the rest
            emit(row)
            free_memory(config.device)
        del built
        free_memory(config.device)


def run_setting_interleaved(factories: dict, variant: str, resolution: Resolution, dtype_name: str, batches: list,
                            config, reference: ReferenceLabels, emit: Callable[[dict], None],
                            log: Callable[[str], None] | None = None) -> None:
    """Interleaved: every runner of the setting built once, then per batch their timed calls in rounds (arguments as
    :func:`run_setting_row_by_row`; ``log`` as :func:`measure_setting_interleaved`'s)."""
    runners = [_build(factories, name, variant, resolution, dtype_name, config) for name in config.runners]
    for batch in batches:
        rows = [_new_row(built, variant, resolution, batch, dtype_name, config) for built in runners]
        measure_setting_interleaved(runners, rows, resolution, batch, DTYPES[dtype_name], config, reference, log)
        for built, row in zip(runners, rows):
            if row["status"] == "skipped" and built.failure is None:
                built.failure = (row["status"], row["reason"])  # e.g. compile failed: skip the rest
            emit(row)
        free_memory(config.device)
    del runners
    free_memory(config.device)


__all__ = ["BuiltRunner", "failure_status", "build_runner", "first_calls", "latency_summary", "measure",
           "expected_output_shape", "timed_callable", "measure_row_alone", "measure_setting_interleaved",
           "run_setting_row_by_row", "run_setting_interleaved"]
