"""Sliding-window inference (mmseg's ``mode='slide'``) on the windows of ``inference.windows``: :func:`slide_logits`
(the full-resolution logits, as mmseg computes them) and :func:`slide_labels` (the full-resolution labels computed a
band of rows at a time, so the full-resolution logits never exist at once).
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
        y1, y2, x1, x2 = group[0]
        padded = pad_to_crop and (y2 - y1 < crop[0] or x2 - x1 < crop[1])
        logits = forward_windows(forward, pixel_values, group, num_labels, crop, pad_to_crop)
        size = crop if padded else (y2 - y1, x2 - x1)
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
    for the output rows ``out_rows`` (int64): PyTorch's ``upsample_bilinear2d`` index arithmetic, one axis."""
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
    chunk_bytes: int = 64 * 2**20,
) -> list[torch.Tensor]:
    """Label maps of mmseg's slide mode, streamed: int64 (h_i, w_i) per image, for ``sizes`` [(h_i, w_i)].

    The result is argmax over classes of :func:`slide_logits` resized (bilinear, align_corners=False) to each
    image's size, without ever holding the full-resolution logits: each window's logits stay at the model's 1/4
    resolution, only while a row still to be labelled lies in their window row, and the labels are produced in
    chunks of rows (each chunk's window-upsampled, averaged and resized logits at most ``chunk_bytes`` of float32).
    Peak memory is proportional to a row of windows at 1/4 resolution plus one chunk, not to classes x image size.
    Equal to the full-buffer computation up to float rounding (the interpolation is computed in its separable form,
    rows then columns). ``progress(done, total)`` counts the work in steps, windows and label bands: it is called
    after each forward call (with the windows it ran) and after each band of labels, so a bar over it keeps moving
    through the label passes between window rows; ``total`` is the windows plus the bands.
    """
    check_slide_arguments(pixel_values, num_labels, windows_per_call)
    crop, stride = resolve_window(crop, stride)
    batch, _, height, width = pixel_values.shape
    if len(sizes) != batch:
        raise ValueError(f"sizes must give one (height, width) per image: {batch} images, {len(sizes)} sizes")
    windows = window_grid(height, width, crop, stride)
    row_spans = sorted({(y1, y2) for y1, y2, _, _ in windows})
    device = pixel_values.device
    window_logits: dict = {}  # (y1, y2, x1, x2) -> (B, K, h', w') float32 at the model's resolution
    done_steps = 0  # windows run + label bands written, for progress
    total_steps = len(windows)  # + the bands, once they are planned below

    def report(steps: int) -> None:
        nonlocal done_steps
        done_steps += steps
        if progress is not None:
            progress(done_steps, total_steps)

    def compute_window_row(span):
        row = [window for window in windows if window[:2] == span]
        for start in range(0, len(row), windows_per_call):
            group = row[start:start + windows_per_call]
            logits = forward_windows(forward, pixel_values, group, num_labels, crop, pad_to_crop)
            for index, window in enumerate(group):
                window_logits[window] = logits[index * batch:(index + 1) * batch].float()
            report(len(group))

    def averaged_rows(image: int, first: int, last: int) -> torch.Tensor:
        """Rows [first, last] of slide_logits for one image, (1, K, n, width), from the windows covering them."""
        rows = torch.arange(first, last + 1)
        total = torch.zeros(1, int(num_labels), len(rows), width, dtype=torch.float32, device=device)
        count = torch.zeros(len(rows), width, dtype=torch.float32, device=device)
        for (y1, y2, x1, x2), logits in window_logits.items():
            lo, hi = max(first, y1), min(last, y2 - 1)
            if lo > hi:
                continue
            up_h, up_w = (crop if pad_to_crop and (y2 - y1 < crop[0] or x2 - x1 < crop[1]) else (y2 - y1, x2 - x1))
            local = torch.arange(lo - y1, hi - y1 + 1)
            upsampled = _resize_rows(logits[image:image + 1], local, logits.shape[2], up_h, up_w)[:, :, :, : x2 - x1]
            total[:, :, lo - first:hi - first + 1, x1:x2] += upsampled
            count[lo - first:hi - first + 1, x1:x2] += 1
        return total.div_(count)

    # every image's output rows in chunks, each needing a band [first, last] of the slide rows; processed in the
    # order of their bands so that window rows are computed once and dropped once no band below needs them
    tasks = []
    for image, (out_h, out_w) in enumerate(sizes):
        rows_per_chunk = max(1, chunk_bytes // (4 * int(num_labels) * max(width, out_w) * 3))
        for start in range(0, out_h, rows_per_chunk):
            out_rows = torch.arange(start, min(start + rows_per_chunk, out_h))
            if (out_h, out_w) == (height, width):
                first, last = int(out_rows[0]), int(out_rows[-1])
            else:
                i0, i1, _ = _row_weights(out_rows, height, out_h)
                first, last = int(i0.min()), int(i1.max())
            tasks.append((first, last, image, out_rows))
    tasks.sort(key=lambda task: (task[1], task[0]))
    total_steps += len(tasks)
    labels = [torch.empty(h, w, dtype=torch.int64, device=device) for h, w in sizes]
    next_span = 0
    for number, (first, last, image, out_rows) in enumerate(tasks):
        while next_span < len(row_spans) and row_spans[next_span][0] <= last:
            compute_window_row(row_spans[next_span])
            next_span += 1
        lowest_needed = min(task[0] for task in tasks[number:])
        for window in [w for w in window_logits if w[1] <= lowest_needed]:
            del window_logits[window]
        band = averaged_rows(image, first, last)
        out_h, out_w = sizes[image]
        if (out_h, out_w) != (height, width):
            band = _resize_rows(band, out_rows, height, out_h, out_w, first_row=first)
        labels[image][out_rows[0]:out_rows[-1] + 1] = band[0].argmax(0)
        report(1)
    return labels
