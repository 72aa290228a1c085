"""What the verbs share: option groups (scale-out), the checks of arguments made once before any work, and the
notes printed before a model is loaded."""

from __future__ import annotations

import contextlib
import signal
import sys

import torch

from segformer_fast.core.runtime import cpu_has_fast_bf16
from segformer_fast.inference.processing import output_size
from segformer_fast.jobs.workers import check_pool, torchrun_world

DTYPE_HELP = ("compute dtype (default fp32). fp16 is for GPUs (on a CPU it runs, usually slower than fp32); bf16 is "
              "fast on GPUs and on CPUs with AVX512-BF16 or AMX, elsewhere slower than fp32")
MODEL_HELP = "checkpoint: folder, weights file or hub id"
DEVICE_HELP = "auto (cuda if available), cpu, cuda, cuda:N"


def note_half_precision_on_cpu(device: torch.device, dtype: torch.dtype) -> None:
    """One line on stderr when a half-precision dtype will run slowly on a CPU: fp16 always, bf16 on a CPU without
    native bf16 (``runtime.cpu_has_fast_bf16``)."""
    if device.type != "cpu" or dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_fast_bf16()):
        return
    if dtype == torch.float16:
        print("note: --dtype fp16 on CPU is usually slower than fp32 (few CPU kernels are fast in fp16); it is meant "
              "for GPUs", file=sys.stderr)
    else:
        print("note: --dtype bf16 on this CPU is usually slower than fp32 (it has no AVX512-BF16 or AMX, so bf16 is "
              "emulated)", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM arrived while a command wrote files: raised in the main thread, a BaseException as KeyboardInterrupt
    (no ``except Exception`` swallows it), so the atomic writers remove their temporary files on the way out; the
    command ends with one line and exit code 143 (128 + SIGTERM)."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs, SIGTERM raises :class:`Terminated`; the previous handler comes back after."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_resize(resize: dict) -> dict:
    """The checks ``preprocess`` makes on its resize arguments, made before any work (ValueError); ``resize``."""
    if resize.get("max_long_side") is not None and resize.get("short_side") is None:
        raise ValueError("--max-long-side needs --short-side")
    if resize.get("short_side") is not None or resize.get("size") is not None:
        output_size(1, 1, **resize)
    return resize


def check_positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")


#: Images per batch sent to a Ray worker or run at once by a torchrun rank, where --batch-size is not given.
DEFAULT_BATCH_SIZE = 4


def add_scaleout_arguments(parser, *, torchrun_batches: bool) -> None:
    """The scale-out options of ``segment`` and ``eval`` (``torchrun_batches``: a torchrun rank runs --batch-size
    images at once, as ``segment``'s ranks do)."""
    group = parser.add_argument_group(
        "scale-out", "Ray Data (--ray), or torchrun: torchrun --nproc-per-node N -m segformer_fast ...")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: a local cluster, or the running one at ADDRESS (auto, host:6379, "
                            "ray://host:10001)")
    group.add_argument("--workers", type=int, metavar="N", help="Ray actors, one engine each (default 1; --ray only)")
    group.add_argument("--gpus-per-worker", type=float, metavar="F",
                       help="GPUs per Ray actor (fractions share a GPU; default 1 where the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-worker", type=float, metavar="C",
                       help="CPUs per Ray actor, also its torch threads (default 1)")
    where = "sent to a Ray worker or run at once by a torchrun rank" if torchrun_batches else "sent to a Ray worker"
    group.add_argument("--batch-size", type=int, metavar="B",
                       help=f"images per batch {where} (default {DEFAULT_BATCH_SIZE}; --ray"
                            f"{' or torchrun' if torchrun_batches else ''} only: a plain run takes one image at a "
                            "time)")


def wants_scaleout(args) -> bool:
    """True when the command runs on Ray (--ray) or under torchrun."""
    return getattr(args, "ray", None) is not None or torchrun_world() is not None


def check_scaleout_arguments(args, *, torchrun_batches: bool) -> None:
    """The scale-out options' checks, before any work: the Ray-only options need --ray, --batch-size needs --ray
    (or torchrun, with ``torchrun_batches``); counts are positive."""
    if not hasattr(args, "ray"):  # a parser without the scale-out group
        return
    if args.ray is None:
        given = [flag for flag, value in (("--workers", args.workers), ("--gpus-per-worker", args.gpus_per_worker),
                                          ("--cpus-per-worker", args.cpus_per_worker)) if value is not None]
        batches = torchrun_batches and torchrun_world() is not None
        if args.batch_size is not None and not batches:
            given.append("--batch-size")
        if given:
            where = "; under torchrun the processes are torchrun's --nproc-per-node" if torchrun_world() else ""
            only = "--ray or torchrun" if given == ["--batch-size"] and torchrun_batches else "--ray"
            plain = "; a plain run takes one image at a time" if given == ["--batch-size"] else where
            raise ValueError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {only} only{plain}")
    check_pool(**{key: value for key, value in ray_pool(args).items() if key != "address"})


def ray_pool(args) -> dict:
    """The Ray pool keywords of ``segment_with_ray`` / ``evaluate_with_ray`` from the options (an option not given:
    its default)."""
    return {"workers": 1 if args.workers is None else args.workers, "gpus_per_worker": args.gpus_per_worker,
            "cpus_per_worker": 1 if args.cpus_per_worker is None else args.cpus_per_worker,
            "batch_size": batch_size(args), "address": args.ray}


def batch_size(args) -> int:
    """--batch-size, or its default."""
    return DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
