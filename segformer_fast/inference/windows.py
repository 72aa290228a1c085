"""Sliding windows (mmseg's ``mode='slide'``): the window geometry, the checks of slide mode's arguments, and one
forward over a group of windows (``inference.slide`` computes logits and labels from them).

A grid of ``crop``-sized windows ``stride`` apart covers the image; windows are clamped to the image (the last
row/column of windows ends on the image border), a window larger than the image is the whole image. Each window's
logits (at 1/4) are upsampled (bilinear, align_corners=False) to the window size, summed into a full-size buffer and
divided by how many windows cover each pixel. The SegFormer configs use crop 1024x1024, stride 768 for Cityscapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Default sliding-window crop (SegFormer's Cityscapes test config); the default stride is 2/3 of the crop.
DEFAULT_CROP = (1024, 1024)


def _positive_pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{what} must be an int or a (height, width) pair, got {value!r}")
    pair = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what} must be positive integers, got {tuple(value)!r}")
        pair.append(int(v))
    return pair[0], pair[1]


def default_stride(crop) -> tuple[int, int]:
    """2/3 of the crop, rounded, per side (at least 1)."""
    crop_h, crop_w = _positive_pair(crop, "crop")
    return max(1, round(crop_h * 2 / 3)), max(1, round(crop_w * 2 / 3))


def resolve_window(crop=None, stride=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop, stride) with the defaults filled in; ValueError for non-positive sizes or a stride beyond the crop
    (it would leave pixels no window covers)."""
    crop = DEFAULT_CROP if crop is None else _positive_pair(crop, "crop")
    stride = default_stride(crop) if stride is None else _positive_pair(stride, "stride")
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise ValueError(f"stride must not exceed the crop (pixels between windows would get no prediction), got "
                         f"stride {stride} for crop {crop}")
    return crop, stride


def window_grid(height: int, width: int, crop, stride) -> list[tuple[int, int, int, int]]:
    """The windows (y1, y2, x1, x2) of mmseg's slide inference over a height x width image, row by row.

    Rows: ``max(height - crop_h + stride_h - 1, 0) // stride_h + 1`` of them; window r starts at r * stride_h, ends
    at ``min(start + crop_h, height)`` and then starts at ``max(end - crop_h, 0)`` (clamped to the image); the same
    for columns.
    """
    crop_h, crop_w = _positive_pair(crop, "crop")
    stride_h, stride_w = _positive_pair(stride, "stride")

    def spans(size, crop_size, step):
        count = max(size - crop_size + step - 1, 0) // step + 1
        out = []
        for index in range(count):
            end = min(index * step + crop_size, size)
            out.append((max(end - crop_size, 0), end))
        return out

    return [(y1, y2, x1, x2) for y1, y2 in spans(height, crop_h, stride_h) for x1, x2 in spans(width, crop_w, stride_w)]


def _check_batch(pixel_values) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor (B, 3, H, W), got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or 0 in pixel_values.shape:
        raise ValueError(f"pixel_values must have shape (B, 3, H, W) with B, H, W >= 1, got "
                         f"{tuple(pixel_values.shape)}")


def _check_logits(logits, batch: int, num_labels: int | None, what: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"forward must return logits (B={batch}, K, h, w) for {what}, got {shape}")
    if num_labels is not None and logits.shape[1] != num_labels:
        raise ValueError(f"forward returned {logits.shape[1]} classes for {what}, expected num_labels={num_labels}")


def check_slide_arguments(pixel_values, num_labels, windows_per_call) -> None:
    _check_batch(pixel_values)
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    if isinstance(windows_per_call, bool) or not isinstance(windows_per_call, int) or windows_per_call < 1:
        raise ValueError(f"windows_per_call must be a positive integer, got {windows_per_call!r}")


def forward_windows(forward, pixel_values, group, num_labels, crop, pad_to_crop) -> torch.Tensor:
    """forward over the windows ``group`` [(y1, y2, x1, x2)] of one size as one batch: logits (len(group) * B, K,
    h', w'), window-major. With ``pad_to_crop`` a window smaller than ``crop`` is zero-padded (bottom/right) to it."""
    crops = []
    for y1, y2, x1, x2 in group:
        window = pixel_values[:, :, y1:y2, x1:x2]
        if pad_to_crop and (y2 - y1 < crop[0] or x2 - x1 < crop[1]):
            window = F.pad(window, (0, crop[1] - (x2 - x1), 0, crop[0] - (y2 - y1)))
        crops.append(window)
    logits = forward(torch.cat(crops) if len(crops) > 1 else crops[0].contiguous())
    _check_logits(logits, pixel_values.shape[0] * len(group), num_labels,
                  f"a {crops[0].shape[2]}x{crops[0].shape[3]} window")
    return logits
