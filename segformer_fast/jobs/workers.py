"""The processes that do a job's work: a worker's name in the records and its torch threads, the one check of a
worker pool's sizes (made by the CLI before any work and by the executors that take them), and whether this
process is a torchrun rank."""

from __future__ import annotations

import os
import socket

import torch


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def set_threads(cpus: float) -> None:
    """torch threads for a worker holding ``cpus`` CPUs (at least one)."""
    torch.set_num_threads(max(1, int(cpus)))


def check_pool(*, workers: int = 1, batch_size: int = 4, gpus_per_worker: float | None = None,
               cpus_per_worker: float = 1) -> None:
    """ValueError, naming the keyword and its command-line option, for a pool size out of range: ``workers`` and
    ``batch_size`` positive integers, ``gpus_per_worker`` None (the cluster decides) or a number >= 0,
    ``cpus_per_worker`` a number > 0."""
    for name, value in (("workers", workers), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, got {value!r}")
    if gpus_per_worker is not None and not (isinstance(gpus_per_worker, (int, float)) and gpus_per_worker >= 0):
        raise ValueError(f"gpus_per_worker (--gpus-per-worker) must be a number >= 0, got {gpus_per_worker!r}")
    if not (isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0):
        raise ValueError(f"cpus_per_worker (--cpus-per-worker) must be a number > 0, got {cpus_per_worker!r}")


def torchrun_world() -> tuple | None:
    """(rank, local_rank, world_size) when this process was started by torchrun (its environment), else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them), got "
                         f"{os.environ.get('RANK')!r}, {os.environ.get('LOCAL_RANK')!r}, "
                         f"{os.environ.get('WORLD_SIZE')!r}") from None
