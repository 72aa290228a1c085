""":class:`SegmentSettings`: what a job's workers need to know to build their engine and segment, whichever executor
runs them (the eval job reads the same settings)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from segformer_fast.jobs.outputs import DEFAULT_OUTPUTS, parse_outputs


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
