"""The ``segment`` driver (:func:`segment_images`): images -> label maps with ``mode`` "whole", "slide" or "auto"
(whole, and on out-of-memory a warning and sliding windows), for any ``forward`` (the engine's ``logits``, the
reference model, transformers' model; ``segformer_fast.jobs.predictors.build_forward`` builds them).
``SegformerEngine.segment``, the CLI and the evaluation use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from segformer_fast.core.runtime import is_out_of_memory
from segformer_fast.inference.processing import as_rgb_image, output_size, postprocess, preprocess
from segformer_fast.inference.slide import slide_labels
from segformer_fast.inference.windows import resolve_window

MODES = ("whole", "slide", "auto")


def _as_rgb_images(images) -> tuple[list, bool]:
    """(list of 8-bit RGB PIL images, single?) with the package's input contract and errors."""
    single = not isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    if not batch:
        raise ValueError("segment() needs at least one image, got an empty list")
    out = []
    for index, image in enumerate(batch):
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]  # RGBA: alpha dropped without compositing, as load_image does for files
        out.append(as_rgb_image(image, index))
    return out, single


def _default_whole_labels(forward):
    """Whole-image labels with transformers' post-processing (each image's logits upsampled on their own)."""
    def whole_labels(pixel_values, sizes):
        labels = postprocess(forward(pixel_values), sizes)
        return list(labels)

    return whole_labels


def segment_images(
    images,
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_labels: int,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    size=(512, 512),
    mode: str = "whole",
    crop=None,
    stride=None,
    short_side: int | None = None,
    max_long_side: int | None = None,
    whole_labels: Callable | None = None,
    label_pass: Callable | None = None,
    windows_per_call: int = 1,
    progress: Callable[[int, int], None] | None = None,
    on_auto_choice: Callable[[str, tuple[int, int]], None] | None = None,
):
    """Label maps (int64, (H_i, W_i) at each image's own size) for PIL images, HWC uint8 arrays or paths.

    Resizing: ``short_side`` -> keep-ratio (mmseg), else ``size`` (H, W), else (``size=None``) none. Images that
    resize to the same size run as one batch. mode "whole": one forward per batch, then bilinear upsampling to
    each image's size and argmax (``whole_labels(pixel_values, sizes)`` if given, e.g. the engine's fused op);
    "slide": :func:`slide_logits` with ``crop`` (default 1024x1024) and ``stride`` (default 2/3 of the crop),
    resized to each image's size, argmax, streamed by :func:`slide_labels` with ``label_pass`` (default: torch
    ops; ``progress(done, total)`` counts the windows of each group of same-size images); "auto": whole, and where
    that runs out of memory a warning and slide, with ``on_auto_choice(mode, (H, W))`` called per group of same-size
    images with the mode it ran in ("whole" or "slide") and the size the images were resized to. Returns one tensor
    for a single image, else a list.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    window = resolve_window(crop, stride)
    pil_images, single = _as_rgb_images(images)
    whole_labels = whole_labels or _default_whole_labels(forward)

    groups: dict = {}
    for index, image in enumerate(pil_images):
        if short_side is not None:
            target = output_size(image.height, image.width, short_side=short_side, max_long_side=max_long_side)
        elif size is None:
            if max_long_side is not None:
                raise ValueError("max_long_side only applies in keep-ratio mode: pass short_side as well")
            target = (image.height, image.width)
        else:
            target = output_size(image.height, image.width, size)
        groups.setdefault(target, []).append(index)

    labels: list = [None] * len(pil_images)
    for target, indices in groups.items():
        group = [pil_images[i] for i in indices]
        pixel_values, sizes = preprocess(group, size=target, size_divisor=None, device=device, dtype=dtype,
                                         return_sizes=True)
        if mode == "slide":
            out = slide_labels(forward, pixel_values, sizes, num_labels, *window,
                               windows_per_call=windows_per_call, progress=progress, label_pass=label_pass)
        elif mode == "whole":
            out = whole_labels(pixel_values, sizes)
        else:
            failure = None
            try:
                out = whole_labels(pixel_values, sizes)
            except BaseException as error:  # noqa: B036  (only out-of-memory errors are handled)
                if not is_out_of_memory(error):
                    raise
                failure = str(error).splitlines()[0] if str(error) else type(error).__name__
            if on_auto_choice is not None:
                on_auto_choice("whole" if failure is None else "slide", target)
            if failure is not None:  # outside the except block: the failed attempt's tensors are released by now
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"segment(mode='auto'): whole-image inference of a {len(group)} x {target[0]}x{target[1]} batch "
                    f"ran out of memory ({failure}); moved to sliding windows with crop {window[0][0]}x"
                    f"{window[0][1]} and stride {window[1][0]}x{window[1][1]}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                out = slide_labels(forward, pixel_values, sizes, num_labels, *window, windows_per_call=windows_per_call,
                                   progress=progress, label_pass=label_pass)
        for i, label in zip(indices, out):
            labels[i] = label
    return labels[0] if single else labels
