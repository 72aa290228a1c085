"""The scale-out side of the ``segment`` and ``eval`` commands: their options, and running them on Ray (``--ray``)
or under torchrun (``torchrun --nproc-per-node N -m segformer_fast ...``), printing the summary."""

from __future__ import annotations

import math
import sys
import time

from .distributed import evaluate_torchrun, segment_torchrun
from .evaluation import format_summary, write_report
from .ray_segment import evaluate_with_ray, segment_with_ray
from .scaleout import check_model_classes, eval_settings_from_args, settings_from_segment_args, torchrun_world


def add_scaleout_arguments(parser) -> None:
    """The scale-out options of ``segment`` and ``eval``."""
    group = parser.add_argument_group(
        "scale-out", "Ray Data (--ray), or torchrun: torchrun --nproc-per-node N -m segformer_fast ...")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: a local cluster, or the running one at ADDRESS (auto, host:6379, "
                            "ray://host:10001)")
    group.add_argument("--workers", type=int, default=1, metavar="N", help="Ray actors, one engine each (default 1)")
    group.add_argument("--gpus-per-worker", type=float, metavar="F",
                       help="GPUs per Ray actor (fractions share a GPU; default 1 where the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-worker", type=float, default=1, metavar="C",
                       help="CPUs per Ray actor, also its torch threads (default 1)")
    group.add_argument("--batch-size", type=int, default=4, metavar="B",
                       help="images per batch sent to a worker (Ray) or run at once by a rank (torchrun; default 4)")
    group.add_argument("--retry-failed", action="store_true",
                       help="segment: also redo the images the manifest records as failed (else a re-run skips them)")


def wants_scaleout(args) -> bool:
    """True when the command runs on Ray (--ray) or under torchrun."""
    return getattr(args, "ray", None) is not None or torchrun_world() is not None


def _needs_ray(command):
    """Turns a missing ray into the command's usage error (exit code 2) naming the extra to install."""

    def run(args) -> int:
        try:
            return command(args)
        except ImportError as error:
            print(f"segformer-fast: {error}", file=sys.stderr)
            return 2

    return run


@_needs_ray
def segment_command(args) -> int:
    """``segformer-fast segment`` on Ray or under torchrun: run, print the summary, return the exit code."""
    settings = settings_from_segment_args(args)
    if torchrun_world() is not None:
        summary = segment_torchrun(args.inputs, args.out, settings, device=args.device, batch_size=args.batch_size,
                                   retry_failed=args.retry_failed, progress=not args.quiet)
    else:
        summary = segment_with_ray(args.inputs, args.out, settings, workers=args.workers,
                                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                                   batch_size=args.batch_size, address=args.ray, retry_failed=args.retry_failed,
                                   progress=not args.quiet)
    if summary.report:
        print(summary.format(), file=sys.stderr if summary.exit_code else sys.stdout)
    return summary.exit_code


@_needs_ray
def eval_command(args) -> int:
    """``segformer-fast eval`` on Ray or under torchrun: the same report as one process (rank 0 prints it)."""
    settings, dataset, report_settings = eval_settings_from_args(args)
    check_model_classes(settings.model, dataset)
    start = time.perf_counter()
    if torchrun_world() is not None:
        result, where = evaluate_torchrun(dataset, settings, device=args.device, progress=not args.quiet)
    else:
        result = evaluate_with_ray(dataset, settings, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                                   cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                   address=args.ray, progress=not args.quiet)
        where = f"Ray, {args.workers} worker{'s' if args.workers != 1 else ''}"
    if result is None:  # a torchrun rank other than 0
        return 0
    seconds = time.perf_counter() - start
    result["settings"] = {**report_settings, "scale_out": where}
    images = result["counts"]["images"]
    print(f"{args.format} {args.data}: {args.engine} engine, {args.mode} mode, {args.dtype}, {where}")
    print(format_summary(result))
    print(f"{images} images in {seconds:.1f} s: {images / seconds if seconds > 0 else math.nan:.2f} images/s")
    if args.out:
        write_report(result, args.out)
        print(f"report written to {args.out}")
    return 0
