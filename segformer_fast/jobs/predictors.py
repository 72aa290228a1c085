"""Forwards and predictors for a reference ``Segformer`` run by one of three engines, shared by ``segment`` and
``eval``.

- :func:`build_forward`: (forward, the label options) for :func:`segformer_fast.inference.segment.segment_images` with
  ``engine`` "fast" (``segformer_fast.optimize``), "reference" (the eager model) or "transformers" (transformers'
  model with the same weights).
- :func:`make_predictor`: an image -> (H, W) label map callable (resize, inference mode, device, dtype fixed), the
  ``Predictor`` that the eval job scores (``segment`` runs ``build_forward`` through its ``SegmentWorker``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from segformer_fast.core.runtime import parse_dtype
from segformer_fast.engine.engine import optimize, slide_label_pass
from segformer_fast.inference.segment import MODES, segment_images

ENGINES = ("fast", "reference", "transformers")


def build_forward(model, engine: str = "fast", dtype: torch.dtype | str = torch.float32):
    """(forward, label options) to run a reference ``Segformer`` with ``engine`` in ``dtype``, for
    :func:`segformer_fast.inference.segment.segment_images`: "fast" (``optimize``; its fused ``upsample_argmax`` does
    the whole-image labels), "reference" (the eager model, cast to ``dtype`` in place) or "transformers" (transformers'
    model with the same weights). ``forward``: pixel_values (B, 3, H, W) -> logits (B, K, H/4, W/4). The label
    options are ``segment_images``' ``whole_labels`` (the engine's; else transformers' post-processing) and
    ``label_pass`` (sliding windows' label pass on the model's device, the same for every engine)."""
    dtype = parse_dtype(dtype)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    options = {"label_pass": slide_label_pass(model.device)}
    if engine == "fast":
        fast = optimize(model, dtype=dtype)
        return fast.logits, {**options, "whole_labels": fast.whole_labels}
    if engine == "reference":
        return model.to(dtype=dtype).eval(), options
    hf_model = model.to(dtype=dtype).to_transformers()

    def forward(pixel_values):
        return hf_model(pixel_values=pixel_values).logits

    return forward, options


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
    forward, label_options = build_forward(model, engine, dtype)
    options = dict(resize) if resize else {"size": (512, 512)}

    def predict(image: Image.Image, *, progress=None, on_auto_choice=None) -> np.ndarray:
        with torch.inference_mode():
            labels = segment_images(image, forward, num_labels=model.config.num_labels, device=device, dtype=dtype,
                                    mode=mode, crop=crop, stride=stride, **label_options,
                                    windows_per_call=windows_per_call, progress=progress,
                                    on_auto_choice=on_auto_choice, **options)
        return labels.cpu().numpy()

    return predict
