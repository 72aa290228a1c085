"""Forwards and predictors for a reference ``Segformer`` run by one of three engines, shared by ``segment`` and
``eval``.

- :func:`build_forward`: (forward, whole_labels) for :func:`segformer_fast.inference.segment.segment_images` with
  ``engine`` "fast" (``segformer_fast.optimize``), "reference" (the eager model) or "transformers" (transformers'
  model with the same weights).
- :func:`make_predictor`: an image -> (H, W) label map callable (resize, inference mode, device, dtype fixed), the
  ``Predictor`` that ``segformer_fast.jobs.evaluate.evaluate`` scores and the CLI's ``segment`` writes out.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segformer_fast.core.runtime import parse_dtype
from segformer_fast.engine.engine import optimize
from segformer_fast.inference.segment import MODES, segment_images
from segformer_fast.model.checkpoints import is_hub_id, read_checkpoint, resolve_hub_id
from segformer_fast.model.config import SegformerConfig

ENGINES = ("fast", "reference", "transformers")


def build_forward(model, engine: str = "fast", dtype: torch.dtype | str = torch.float32):
    """(forward, whole_labels) to run a reference ``Segformer`` with ``engine`` in ``dtype``, for
    :func:`segformer_fast.inference.segment.segment_images`: "fast" (``optimize``; its fused ``upsample_argmax`` does
    the whole-image labels), "reference" (the eager model, cast to ``dtype`` in place) or "transformers" (transformers'
    model with the same weights). ``whole_labels`` is None where the default (transformers' post-processing)
    applies. ``forward``: pixel_values (B, 3, H, W) -> logits (B, K, H/4, W/4)."""
    dtype = parse_dtype(dtype)
    if engine == "fast":
        fast = optimize(model, dtype=dtype)
        return fast.logits, fast.whole_labels
    if engine == "reference":
        return model.to(dtype=dtype).eval(), None
    if engine == "transformers":
        hf_model = model.to(dtype=dtype).to_transformers()

        def forward(pixel_values):
            return hf_model(pixel_values=pixel_values).logits

        return forward, None
    raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")


def make_predictor(
    model,
    engine: str = "fast",
    mode: str = "whole",
    *,
    resize: dict | None = None,
    device=None,
    dtype: torch.dtype | str | None = None,
    crop=None,
    stride=None,
    windows_per_call: int = 1,
) -> Callable[[Image.Image], np.ndarray]:
    """An image -> (H, W) int64 label map callable for a reference ``Segformer`` (already on ``device``), through
    :func:`segformer_fast.inference.segment.segment_images`.

    engine: as in :func:`build_forward`. mode: "whole" (resize, one forward, upsample the logits to the image size
    and argmax), "slide" (sliding windows of ``crop`` every ``stride``) or "auto" (whole, slide where whole runs out
    of memory). resize: ``segment_images``' resize arguments (``size``, or ``short_side`` / ``max_long_side``;
    default: fixed 512x512). dtype: a compute dtype or its name (default float32). The predictor's optional
    ``progress`` and ``on_auto_choice`` keywords are passed to ``segment_images`` (sliding-window progress, the mode
    "auto" chose).
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; available: {list(MODES)}")
    dtype = torch.float32 if dtype is None else parse_dtype(dtype)
    device = torch.device(device) if device is not None else model.device
    forward, whole_labels = build_forward(model, engine, dtype)
    options = dict(resize) if resize else {"size": (512, 512)}

    def predict(image: Image.Image, *, progress=None, on_auto_choice=None) -> np.ndarray:
        with torch.inference_mode():
            labels = segment_images(image, forward, num_labels=model.config.num_labels, device=device, dtype=dtype,
                                    mode=mode, crop=crop, stride=stride, whole_labels=whole_labels,
                                    windows_per_call=windows_per_call, progress=progress,
                                    on_auto_choice=on_auto_choice, **options)
        return labels.cpu().numpy()

    return predict


#: Names of the classifier weight, whose first dimension is the class count, in each checkpoint key family.
_CLASSIFIER_KEYS = ("decode_head.classifier.weight", "decode_head.linear_pred.weight")


def _safetensors_num_labels(path: Path) -> int | None:
    """The class count from a .safetensors file's header (shapes only, no tensor read), or None."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(min(length, 1 << 26)))
    except (OSError, ValueError, struct.error):
        return None
    for key, entry in header.items():
        if isinstance(entry, dict) and key.endswith(_CLASSIFIER_KEYS):
            return int(entry["shape"][0])
    return None


def checkpoint_num_labels(source) -> int:
    """How many classes the checkpoint at ``source`` predicts, read from its config.json (a folder or a hub id's
    snapshot) or a .safetensors header, without reading its weights; other files are read whole."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists() and is_hub_id(source):
        path = resolve_hub_id(str(source))
    config_path = path / "config.json"
    if path.is_dir() and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
            return SegformerConfig.from_transformers_dict(config, str(config_path)).num_labels
        except (ValueError, TypeError, AttributeError):
            pass  # read_checkpoint names the problem below
    if path.is_file() and path.suffix == ".safetensors":
        found = _safetensors_num_labels(path)
        if found is not None:
            return found
    return read_checkpoint(path if path.exists() else source)[0].num_labels


def check_model_classes(source, dataset) -> None:
    """ValueError when the checkpoint's class count differs from the dataset's (the config only, see
    :func:`checkpoint_num_labels`): the one check every way of running ``eval`` makes before its work."""
    num_classes = checkpoint_num_labels(source)
    if num_classes != dataset.num_classes:
        raise ValueError(f"{source} predicts {num_classes} classes but {dataset.format} has {dataset.num_classes}; "
                         "use a checkpoint trained on this dataset")
