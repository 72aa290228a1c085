"""Sliding-window inference (mmseg's ``mode='slide'``) on the windows of ``inference.windows``: :func:`slide_logits`
(the full-resolution logits, as mmseg computes them) and :func:`slide_labels` (the full-resolution labels, streamed:
each window's logits stay at the model's 1/4 resolution, only while a row still to be labelled lies in their window
row, and a label pass turns the finished rows into labels, so the full-resolution logits never exist at once).

The label pass is a callable with the signature of ``segformer_fast.ops.extension.slide_argmax`` (the engine passes
that CPU op, which reads each output row's windows once); :func:`torch_label_pass` is the default, in torch ops on
any device, equal to it up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from segformer_fast.inference.windows import (
    DEFAULT_CROP,
    check_slide_arguments,
    forward_windows,
    resolve_window,
    window_grid,
)


def slide_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    num_labels: int,
    crop=DEFAULT_CROP,
    stride=None,
    *,
    pad_to_crop: bool = False,
    windows_per_call: int = 1,
) -> torch.Tensor:
    """mmseg's slide mode: float32 logits (B, K, H, W) at the input's full resolution.

    forward: pixel_values (b, 3, h, w) -> logits (b, K, h', w') (at 1/4; any size works, it is resized to the
    window). crop, stride: (h, w) or an int; stride defaults to 2/3 of the crop. Windows come from
    :func:`window_grid`; each window's logits are upsampled (bilinear, align_corners=False) to the window's size in
    float32, summed into a zero buffer and divided by the per-pixel window count. When one window covers the image
    the result is exactly mmseg's whole mode: ``forward(pixel_values)`` upsampled to the input size in float32.

    pad_to_crop: as the official SegFormer code, zero-pad a window smaller than ``crop`` (only when the image is
    smaller than the crop) at the bottom/right to the crop size, and keep the window's part of the padded window's
    upsampled logits. windows_per_call: run up to this many windows (of the same size) as one batch per forward
    call (faster on GPUs, more memory; the default 1 is what mmseg does).
    """
    check_slide_arguments(pixel_values, num_labels, windows_per_call)
    crop, stride = resolve_window(crop, stride)
    batch, _, height, width = pixel_values.shape
    windows = window_grid(height, width, crop, stride)
    preds = torch.zeros(batch, int(num_labels), height, width, dtype=torch.float32, device=pixel_values.device)
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=pixel_values.device)

    def run(group):
        logits = forward_windows(forward, pixel_values, group, num_labels, crop, pad_to_crop)
        size = _up_size(group[0], crop, pad_to_crop)
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        for index, (y1, y2, x1, x2) in enumerate(group):
            part = logits[index * batch:(index + 1) * batch, :, : y2 - y1, : x2 - x1]
            preds[:, :, y1:y2, x1:x2] += part
            count[:, :, y1:y2, x1:x2] += 1

    for start in range(0, len(windows), windows_per_call):
        run(windows[start:start + windows_per_call])
    return preds.div_(count)


def _row_weights(out_rows: torch.Tensor, in_size: int, out_size: int):
    """Source rows (i0, i1) and weight of i1 of bilinear (align_corners=False) resizing in_size -> out_size rows,
    for the output rows ``out_rows`` (int64): PyTorch's ``upsample_bilinear2d`` index arithmetic, one axis (equal
    sizes copy)."""
    if in_size == out_size:
        return out_rows, out_rows, torch.zeros(len(out_rows))
    scale = in_size / out_size
    source = ((out_rows.double() + 0.5) * scale - 0.5).clamp_(min=0.0)
    i0 = source.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    return i0, i1, (source - i0).float()


def _resize_rows(values: torch.Tensor, rows: torch.Tensor, in_height: int, out_height: int, out_width: int,
                 first_row: int = 0) -> torch.Tensor:
    """Rows ``rows`` of the bilinear (align_corners=False) resize of a (B, K, in_height, W) map to
    (out_height, out_width), given only its rows from ``first_row`` on (``values`` (B, K, n, W)): the rows are
    blended first, then the columns are resized (the separable form of the same interpolation)."""
    i0, i1, weight = _row_weights(rows, in_height, out_height)
    i0, i1 = i0 - first_row, i1 - first_row
    weight = weight.to(values.device)[None, None, :, None]
    blended = values[:, :, i0] * (1 - weight) + values[:, :, i1] * weight
    if blended.shape[3] != out_width:  # a height-preserving resize copies rows exactly, so only columns move
        blended = F.interpolate(blended, size=(blended.shape[2], out_width), mode="bilinear", align_corners=False)
    return blended


def _averaged_rows(window_logits, boxes, up_sizes, first: int, last: int, width: int) -> torch.Tensor:
    """Rows [first, last] of the windows' average (B, K, n, width), from the windows that cover them."""
    batch, num_labels = window_logits[0].shape[:2]
    device = window_logits[0].device
    total = torch.zeros(batch, num_labels, last - first + 1, width, dtype=torch.float32, device=device)
    count = torch.zeros(last - first + 1, width, dtype=torch.float32, device=device)
    for logits, (y1, y2, x1, x2), (up_h, up_w) in zip(window_logits, boxes, up_sizes):
        lo, hi = max(first, y1), min(last, y2 - 1)
        if lo > hi:
            continue
        local = torch.arange(lo - y1, hi - y1 + 1)
        upsampled = _resize_rows(logits.float(), local, logits.shape[2], up_h, up_w)[:, :, :, : x2 - x1]
        total[:, :, lo - first:hi - first + 1, x1:x2] += upsampled
        count[lo - first:hi - first + 1, x1:x2] += 1
    return total.div_(count)


def torch_label_pass(window_logits, boxes, up_sizes, height: int, width: int, labels: torch.Tensor, row_begin: int,
                     row_end: int, *, chunk_bytes: int = 64 * 2**20) -> None:
    """The label pass in torch ops on any device (the contract of ``ops.extension.slide_argmax``): rows
    [row_begin, row_end) of ``labels`` (B, H, W) int64, from the windows' logits (B, K, h_i, w_i) upsampled to
    ``up_sizes``, placed at ``boxes`` of the height x width slide grid, averaged, resized to (H, W) and arg-maxed,
    in chunks of rows whose float32 intermediates take at most ``chunk_bytes``. Equal to the full-buffer
    computation up to float rounding (the interpolation is computed in its separable form, rows then columns)."""
    num_labels = window_logits[0].shape[1]
    out_h, out_w = labels.shape[1:]
    rows_per_chunk = max(1, chunk_bytes // (4 * int(num_labels) * max(width, out_w) * 3))
    for start in range(row_begin, row_end, rows_per_chunk):
        out_rows = torch.arange(start, min(start + rows_per_chunk, row_end))
        if (out_h, out_w) == (height, width):
            first, last = int(out_rows[0]), int(out_rows[-1])
        else:
            i0, i1, _ = _row_weights(out_rows, height, out_h)
            first, last = int(i0.min()), int(i1.max())
        band = _averaged_rows(window_logits, boxes, up_sizes, first, last, width)
        if (out_h, out_w) != (height, width):
            band = _resize_rows(band, out_rows, height, out_h, out_w, first_row=first)
        labels[:, start:start + len(out_rows)] = band.argmax(1)


def slide_labels(
    forward: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    num_labels: int,
    crop=DEFAULT_CROP,
    stride=None,
    *,
    pad_to_crop: bool = False,
    windows_per_call: int = 1,
    progress: Callable[[int, int], None] | None = None,
    label_pass: Callable | None = None,
) -> list[torch.Tensor]:
    """Label maps of mmseg's slide mode, streamed: int64 (h_i, w_i) per image, for ``sizes`` [(h_i, w_i)].

    The result is argmax over classes of :func:`slide_logits` resized (bilinear, align_corners=False) to each
    image's size, without ever holding the full-resolution logits: the windows run a row of windows at a time, each
    window's logits stay at the model's 1/4 resolution until no row left to label lies in it, and after each row of
    windows ``label_pass`` (see the module docstring; default :func:`torch_label_pass`) labels the output rows that
    no later window covers. Peak memory is proportional to a few rows of windows at 1/4 resolution, not to
    classes x image size. ``progress(done, total)`` counts the windows: (0, total) before the first forward, then
    after each forward call (with the windows it ran).
    """
    check_slide_arguments(pixel_values, num_labels, windows_per_call)
    crop, stride = resolve_window(crop, stride)
    batch, _, height, width = pixel_values.shape
    if len(sizes) != batch:
        raise ValueError(f"sizes must give one (height, width) per image: {batch} images, {len(sizes)} sizes")
    label_pass = label_pass or torch_label_pass
    windows = window_grid(height, width, crop, stride)
    row_starts = sorted({y1 for y1, _, _, _ in windows})
    window_logits: dict = {}  # (y1, y2, x1, x2) -> (B, K, h', w') float32 at the model's resolution, grid order
    labels = [torch.empty(1, h, w, dtype=torch.int64, device=pixel_values.device) for h, w in sizes]
    # per image: the first and last slide rows each output row reads, and how many output rows are labelled
    first_rows, last_rows = zip(*(_row_weights(torch.arange(h), height, h)[:2] for h, _ in sizes))
    labelled = [0] * batch
    ran = 0
    if progress is not None:
        progress(0, len(windows))
    for number, row_start in enumerate(row_starts):
        row = [window for window in windows if window[0] == row_start]
        for start in range(0, len(row), windows_per_call):
            group = row[start:start + windows_per_call]
            logits = forward_windows(forward, pixel_values, group, num_labels, crop, pad_to_crop)
            for index, window in enumerate(group):
                window_logits[window] = logits[index * batch:(index + 1) * batch].float()
            ran += len(group)
            if progress is not None:
                progress(ran, len(windows))
        finished = row_starts[number + 1] if number + 1 < len(row_starts) else height  # slide rows no window adds to
        alive = list(window_logits)
        up_sizes = [_up_size(window, crop, pad_to_crop) for window in alive]
        for image in range(batch):
            ready = int((last_rows[image] < finished).sum())
            if ready > labelled[image]:
                label_pass([window_logits[window][image:image + 1] for window in alive], alive, up_sizes, height,
                           width, labels[image], labelled[image], ready)
                labelled[image] = ready
        needed = min((int(first_rows[i][labelled[i]]) for i in range(batch) if labelled[i] < sizes[i][0]),
                     default=height)
        for window in alive:
            if window[1] <= needed:
                del window_logits[window]
    return [label[0] for label in labels]


def _up_size(window, crop, pad_to_crop: bool) -> tuple[int, int]:
    """The size a window's logits are upsampled to: the window's, or the crop's for a window padded to it."""
    y1, y2, x1, x2 = window
    padded = pad_to_crop and (y2 - y1 < crop[0] or x2 - x1 < crop[1])
    return crop if padded else (y2 - y1, x2 - x1)
