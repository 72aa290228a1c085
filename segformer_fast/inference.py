"""Huge-image inference: sliding-window logits, the ``segment`` driver, and a peak-memory model.

- :func:`slide_logits`: mmseg's ``mode='slide'``. A grid of ``crop``-sized windows ``stride`` apart covers the
  image; windows are clamped to the image (the last row/column of windows ends on the image border), a window
  larger than the image is the whole image. Each window's logits (at 1/4) are upsampled (bilinear,
  align_corners=False) to the window size, summed into a full-size buffer and divided by how many windows cover
  each pixel. The SegFormer configs use crop 1024x1024, stride 768 for Cityscapes.
- :func:`segment_images`: images -> label maps with ``mode`` "whole", "slide" or "auto" (whole, and on
  out-of-memory a warning and sliding windows), for any ``forward`` (the engine's ``logits``, the reference model,
  transformers' model; ``segformer_fast.predictors.build_forward`` builds them). ``SegformerEngine.segment``, the
  CLI and the evaluation use it.
- :func:`estimate_peak_memory_bytes`: an analytic model of the peak memory of whole-image inference (see there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import MLP_RATIO, NUM_HEADS, SR_RATIOS, VARIANTS
from .processing import _as_rgb_image, output_size, postprocess, preprocess
from .runtime import is_out_of_memory, parse_dtype

MODES = ("whole", "slide", "auto")
#: Default sliding-window crop (SegFormer's Cityscapes test config); the default stride is 2/3 of the crop.
DEFAULT_CROP = (1024, 1024)


# ------------------------------------------------------------------------------------------------ arguments
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


# ----------------------------------------------------------------------------------------------- logits
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


def _check_slide_arguments(pixel_values, num_labels, windows_per_call) -> None:
    _check_batch(pixel_values)
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    if isinstance(windows_per_call, bool) or not isinstance(windows_per_call, int) or windows_per_call < 1:
        raise ValueError(f"windows_per_call must be a positive integer, got {windows_per_call!r}")


def _window_logits(forward, pixel_values, group, num_labels, crop, pad_to_crop) -> torch.Tensor:
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
    _check_slide_arguments(pixel_values, num_labels, windows_per_call)
    crop, stride = resolve_window(crop, stride)
    batch, _, height, width = pixel_values.shape
    windows = window_grid(height, width, crop, stride)
    preds = torch.zeros(batch, int(num_labels), height, width, dtype=torch.float32, device=pixel_values.device)
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=pixel_values.device)

    def run(group):
        y1, y2, x1, x2 = group[0]
        padded = pad_to_crop and (y2 - y1 < crop[0] or x2 - x1 < crop[1])
        logits = _window_logits(forward, pixel_values, group, num_labels, crop, pad_to_crop)
        size = crop if padded else (y2 - y1, x2 - x1)
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        for index, (y1, y2, x1, x2) in enumerate(group):
            part = logits[index * batch:(index + 1) * batch, :, : y2 - y1, : x2 - x1]
            preds[:, :, y1:y2, x1:x2] += part
            count[:, :, y1:y2, x1:x2] += 1

    for start in range(0, len(windows), windows_per_call):
        run(windows[start:start + windows_per_call])
    return preds.div_(count)


# ------------------------------------------------------------------------------------------------ segment
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
        out.append(_as_rgb_image(image, index))
    return out, single


def _default_whole_labels(forward):
    """Whole-image labels with transformers' post-processing (each image's logits upsampled on their own)."""
    def whole_labels(pixel_values, sizes):
        labels = postprocess(forward(pixel_values), sizes)
        return list(labels)

    return whole_labels


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
    rows then columns). ``progress(done, total)`` is called after each forward call, with windows counted.
    """
    _check_slide_arguments(pixel_values, num_labels, windows_per_call)
    crop, stride = resolve_window(crop, stride)
    batch, _, height, width = pixel_values.shape
    if len(sizes) != batch:
        raise ValueError(f"sizes must give one (height, width) per image: {batch} images, {len(sizes)} sizes")
    windows = window_grid(height, width, crop, stride)
    row_spans = sorted({(y1, y2) for y1, y2, _, _ in windows})
    device = pixel_values.device
    window_logits: dict = {}  # (y1, y2, x1, x2) -> (B, K, h', w') float32 at the model's resolution
    computed = 0

    def compute_window_row(span):
        nonlocal computed
        row = [window for window in windows if window[:2] == span]
        for start in range(0, len(row), windows_per_call):
            group = row[start:start + windows_per_call]
            logits = _window_logits(forward, pixel_values, group, num_labels, crop, pad_to_crop)
            for index, window in enumerate(group):
                window_logits[window] = logits[index * batch:(index + 1) * batch].float()
            computed += len(group)
            if progress is not None:
                progress(computed, len(windows))

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
    return labels


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
    windows_per_call: int = 1,
    progress: Callable[[int, int], None] | None = None,
    on_auto_choice: Callable[[str, tuple[int, int]], None] | None = None,
):
    """Label maps (int64, (H_i, W_i) at each image's own size) for PIL images, HWC uint8 arrays or paths.

    Resizing: ``short_side`` -> keep-ratio (mmseg), else ``size`` (H, W), else (``size=None``) none. Images that
    resize to the same size run as one batch. mode "whole": one forward per batch, then bilinear upsampling to
    each image's size and argmax (``whole_labels(pixel_values, sizes)`` if given, e.g. the engine's fused op);
    "slide": :func:`slide_logits` with ``crop`` (default 1024x1024) and ``stride`` (default 2/3 of the crop),
    resized to each image's size, argmax, streamed by :func:`slide_labels` (``progress(done, total)`` after each
    forward call, windows counted per group of same-size images); "auto": whole, and where that runs out of memory
    a warning and slide, with ``on_auto_choice(mode, (H, W))`` called per group of same-size images with the mode
    it ran in ("whole" or "slide") and the size the images were resized to. Returns one tensor for a single image,
    else a list.
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
                               windows_per_call=windows_per_call, progress=progress)
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
                                   progress=progress)
        for i, label in zip(indices, out):
            labels[i] = label
    return labels[0] if single else labels


# ------------------------------------------------------------------------------------------- memory model
#: Fixed allowance for library workspaces (cuBLAS, cuDNN convolution) and small tensors.
WORKSPACE_BYTES = 32 * 2**20
_MAX_FUSED_OUT_CHANNELS = 256  # kernels.sr_attention: wider stages write the attention output to a temporary


def _grids(height: int, width: int) -> list[tuple[int, int]]:
    """Stage grids: ceil(H/4) x ceil(W/4) (k7 s4 p3), then ceil(h/2) per stage (k3 s2 p1)."""
    h, w = -(-height // 4), -(-width // 4)
    out = [(h, w)]
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


def _parameter_counts(variant: str, num_labels: int) -> dict:
    dims, depths, decoder = VARIANTS[variant]
    encoder = 0
    sr_weights = 0
    patch = (7, 3, 3, 3)
    for i, (c, depth) in enumerate(zip(dims, depths)):
        c_in = 3 if i == 0 else dims[i - 1]
        r = SR_RATIOS[i]
        encoder += c_in * c * patch[i] ** 2 + c + 2 * c + 2 * c  # patch conv, patch LN, stage LN
        hidden = MLP_RATIO * c
        block = 2 * c + 4 * (c * c + c) + 2 * c + (c * hidden + hidden) + 10 * hidden + (hidden * c + c)
        if r > 1:
            block += c * c * r * r + c + 2 * c
            sr_weights += depth * c * c * r * r
        encoder += depth * block
    head = sum(c * decoder + decoder for c in dims) + 4 * decoder * decoder + 4 * decoder + decoder * num_labels \
        + num_labels
    folded_head = sum(dims) * decoder + decoder + decoder * num_labels + num_labels
    return {"encoder": encoder, "sr_weights": sr_weights, "head": head, "folded_head": folded_head}


def estimate_peak_memory_bytes(
    variant: str,
    batch: int,
    height: int,
    width: int,
    dtype: torch.dtype | str = torch.float32,
    num_labels: int = 150,
    engine: bool = True,
    *,
    reference: bool = False,
    kernels: str = "triton",
    labels: bool = True,
    workspace_bytes: int = WORKSPACE_BYTES,
    mode: str = "whole",
    crop=None,
    stride=None,
    windows_per_call: int = 1,
    chunk_bytes: int = 64 * 2**20,
) -> int:
    """Peak device memory (bytes) of inference of a (batch, 3, height, width) input, modelled.

    ``mode="whole"`` (default): one forward over the whole image (below). ``mode="slide"``: the engine's streamed
    sliding windows (:func:`slide_labels` with ``crop``, ``stride``, ``windows_per_call``, ``chunk_bytes``):
    weights + input + the int64 labels + the window logits kept at 1/4 resolution (the window rows that cover a
    row still to be labelled: at most ceil(crop_h / stride_h) + 1 rows of windows, each B K ceil(c_h/4) ceil(c_w/4)
    float32) + the larger of one forward over ``windows_per_call`` windows (the whole-image model at the crop size,
    without its labels) and one chunk of rows (``chunk_bytes``). It grows with the crop and the image width, not
    with classes x image area.

    ``engine=True`` (default): the engine (``optimize``) with plain launches; ``kernels`` "triton" (the CUDA
    default) or "torch". ``reference=True`` (or ``engine=False``): the reference ``Segformer``, whose attention
    materializes the N x Nkv score matrix. ``labels``: include the label map of the post-processing (the engine's
    fused ``upsample_argmax``; the reference's ``F.interpolate`` of the logits to full size + argmax).

    The model counts weights plus the largest set of simultaneously live tensors, with s = bytes per element of
    ``dtype``, B = batch, stage grids h_i x w_i (h_1 = ceil(H/4), h_(i+1) = ceil(h_i/2)), N_i = h_i w_i,
    Nkv_i = max(h_i // R_i, 1) max(w_i // R_i, 1) (N_i for R_i = 1), C_i the stage widths, D the decoder width,
    K = num_labels::

        peak = weights + input (3 B H W s) + max(phases) + workspace_bytes (default WORKSPACE_BYTES, 32 MiB)

    Weights: the engine's prepared tensors (encoder + folded decoder; the Triton path keeps the SR convolutions
    twice, as a conv weight and in GEMM layout), the reference's parameters and BatchNorm statistics.

    Engine phases (in stage i the earlier stages' decoder projections B N_j D s, j < i, and the previous stage's
    tokens B N_(i-1) C_(i-1) s are live):

    - patch embed: conv output, its contiguous copy, normalized tokens: 3 B N_i C_i s;
    - attention (Triton): block input, LN1 output, kv (2 B Nkv_i C_i s), output (+ one more B N_i C_i s for
      C_i > 256, where the kernel writes the attention to a temporary before the out projection); torch path:
      block input, LN1, q, SDPA output, its token-major copy, out projection (6 B N_i C_i s) + reduced tokens and
      kv (3 B Nkv_i C_i s); neither materializes the scores;
    - Mix-FFN (Triton): block input, attention output, LN2 output, the 4C-wide fc1 hidden, block output:
      8 B N_i C_i s (dwconv + GELU are fused into fc2's operand load); torch path: the three C-wide tensors plus
      three 4C-wide ones (fc1 hidden, dwconv output, GELU output or its token-major copy): 15 B N_i C_i s;
    - decoder: all four projections B N_j D s, the logits B K N_1 s and the stage-4 tokens;
    - post-processing: logits + int64 labels 8 B H W.

    Reference phases (earlier stage outputs B N_j C_j s are kept for the decoder):

    - attention: block input, LN1 output, q, kv tokens, k, v, plus the scores: ``q k^T`` and its scaled copy, then
      the float32 softmax (and its cast back for 16-bit dtypes): 8 bytes x B heads_i N_i Nkv_i at the peak;
    - Mix-FFN: old and new tokens, LN2 output, fc1 hidden, its (B, 4C, h, w) copy and the dwconv output:
      15 B N_i C_i s;
    - decoder: the four upsampled projections, their concat and the fused map, 9 B N_1 D s, plus the logits;
    - post-processing: the full-resolution logits B K H W s + int64 labels.

    CUDA graphs (the engine's default on CUDA) keep the graph's memory pool and add a copy of the input and of the
    logits; the estimate is for plain launches (``cuda_graphs=False``). Not counted: the caller's model copy when
    it stays on the device next to the engine.
    """
    if engine is False:
        reference = True
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    variant = str(variant).lower()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    dtype = parse_dtype(dtype)
    for name, value in (("batch", batch), ("height", height), ("width", width), ("num_labels", num_labels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kernels not in ("triton", "torch"):
        raise ValueError(f"kernels must be 'triton' or 'torch', got {kernels!r}")
    if mode == "slide":
        if reference:
            raise ValueError("mode='slide' is modelled for the engine only")
        (crop_h, crop_w), (stride_h, stride_w) = resolve_window(crop, stride)
        crop_h, crop_w = min(crop_h, height), min(crop_w, width)
        window_rows = len({span[:2] for span in window_grid(height, width, (crop_h, crop_w), (stride_h, stride_w))})
        window_cols = len({span[2:] for span in window_grid(height, width, (crop_h, crop_w), (stride_h, stride_w))})
        rows_alive = min(window_rows, -(-crop_h // stride_h) + 1)
        window_logits = batch * num_labels * (-(-crop_h // 4)) * (-(-crop_w // 4)) * 4
        calls = min(windows_per_call, window_rows * window_cols)
        no_workspace = estimate_peak_memory_bytes(variant, batch * calls, crop_h, crop_w, dtype, num_labels,
                                                  kernels=kernels, labels=False, workspace_bytes=0)
        # the window's own input crop counts in its forward; the whole image is held as well
        return int(no_workspace + 3 * batch * height * width * dtype.itemsize + 8 * batch * height * width
                   + rows_alive * window_cols * window_logits + chunk_bytes + workspace_bytes)
    s = dtype.itemsize
    dims, _, decoder = VARIANTS[variant]
    grids = _grids(height, width)
    tokens = [h * w for h, w in grids]
    reduced = [(max(h // r, 1) * max(w // r, 1)) if r > 1 else h * w for (h, w), r in zip(grids, SR_RATIOS)]
    params = _parameter_counts(variant, num_labels)
    pixels = batch * height * width
    input_bytes = 3 * pixels * s
    logits_bytes = batch * num_labels * tokens[0] * s
    phases = []
    if not reference:
        weights = (params["encoder"] + params["folded_head"]
                   + (params["sr_weights"] if kernels == "triton" else 0)) * s
        for i, c in enumerate(dims):
            n, nkv = batch * tokens[i], batch * reduced[i]
            live = sum(batch * tokens[j] * decoder for j in range(i)) * s
            if i:
                live += batch * tokens[i - 1] * dims[i - 1] * s
            if kernels == "triton":
                attention = 3 * n * c + 2 * nkv * c + (n * c if c > _MAX_FUSED_OUT_CHANNELS else 0)
                mixffn = 8 * n * c
            else:
                attention = 6 * n * c + 3 * nkv * c
                mixffn = 15 * n * c
            phases.append(live + s * max(3 * n * c, attention, mixffn, n * (c + decoder)))
        phases.append(sum(batch * t * decoder for t in tokens) * s + logits_bytes + batch * tokens[3] * dims[3] * s)
        if labels:
            phases.append(logits_bytes + 8 * pixels)
    else:
        weights = (params["encoder"] + params["head"]) * s
        kept = 0
        for i, c in enumerate(dims):
            n, nkv = batch * tokens[i], batch * reduced[i]
            live = kept  # the previous stage's output is the last of them
            scores = 8 * NUM_HEADS[i] * n * reduced[i]
            attention = s * (3 * n * c + 3 * nkv * c) + scores
            mixffn = s * 15 * n * c
            phases.append(live + max(attention, mixffn, 2 * s * n * c))
            kept += batch * tokens[i] * c * s
        phases.append(kept + 9 * batch * tokens[0] * decoder * s + logits_bytes)
        if labels:
            phases.append(logits_bytes + batch * num_labels * height * width * s + 8 * pixels)
    return int(weights + input_bytes + max(phases) + workspace_bytes)


__all__ = [
    "DEFAULT_CROP",
    "MODES",
    "default_stride",
    "estimate_peak_memory_bytes",
    "resolve_window",
    "segment_images",
    "slide_labels",
    "slide_logits",
    "window_grid",
]
