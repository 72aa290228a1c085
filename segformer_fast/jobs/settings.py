"""What a job's workers need to know, whichever executor runs them: :class:`SegmentSettings`, the worker's name and
threads, and whether this process is a torchrun rank."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import torch

from .outputs import DEFAULT_OUTPUTS, parse_outputs


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    """What every worker needs to build its engine and segment like ``segformer-fast segment``.

    model: checkpoint source (folder, weights file or hub id) readable by every worker (a relative local path is
    made absolute by :meth:`resolved`, as the inputs and the output folder are). engine: "fast", "reference" or
    "transformers". dtype: "fp32", "fp16" or "bf16". Resizing as ``segment_images``: ``short_side`` (keep ratio,
    ``max_long_side``), else ``size`` (H, W), else none. mode "whole", "slide" or "auto" with ``crop`` / ``stride``.
    outputs: the files written per image (``outputs.OUTPUT_KINDS``); by default the labels PNG, and with
    ``overlay`` the overlay PNG too, its label colors weighted ``alpha``.
    """

    model: str
    engine: str = "fast"
    dtype: str = "fp32"
    size: tuple | None = (512, 512)
    short_side: int | None = None
    max_long_side: int | None = None
    mode: str = "whole"
    crop: tuple | None = None
    stride: tuple | None = None
    overlay: bool = False
    alpha: float = 0.5
    outputs: tuple | None = None

    def resize(self) -> dict:
        if self.short_side:
            return {"short_side": self.short_side, "max_long_side": self.max_long_side, "size": None}
        return {"size": tuple(self.size) if self.size else None}

    @property
    def kinds(self) -> tuple:
        """The output kinds to write (``outputs``, else labels and, with ``overlay``, the overlay PNG)."""
        if self.outputs is not None:
            return parse_outputs(self.outputs)
        return DEFAULT_OUTPUTS if self.overlay else ("labels",)

    def resolved(self) -> "SegmentSettings":
        """These settings with a local relative ``model`` path made absolute (workers may run elsewhere)."""
        path = Path(os.fspath(self.model)).expanduser()
        return dataclasses.replace(self, model=str(path.resolve())) if path.exists() else self

    def fingerprint(self) -> dict:
        """What the outputs depend on, kept in each manifest record: a re-run with other settings redoes them."""
        return {"model": str(self.model), "engine": self.engine, "dtype": self.dtype, "resize": self.resize(),
                "mode": self.mode, "crop": self.crop and list(self.crop), "stride": self.stride and list(self.stride),
                "alpha": self.alpha}


def plural(count: int, noun: str) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class Interrupted(Exception):
    """Ctrl-C during a job: how far it got. The manifest holds every finished image, so a re-run resumes."""

    def __init__(self, done: int, total: int, resumable: bool = True):
        self.done, self.total = done, total
        again = "; run the same command again to resume" if resumable else ""
        super().__init__(f"interrupted after {done} of {plural(total, 'image')}{again}")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def set_threads(cpus: float) -> None:
    """torch threads for a worker holding ``cpus`` CPUs (at least one)."""
    torch.set_num_threads(max(1, int(cpus)))


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
