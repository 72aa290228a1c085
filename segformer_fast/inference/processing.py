"""Image pre- and post-processing for SegFormer.

``preprocess`` turns images into the model's ``pixel_values``; ``postprocess`` turns logits into label maps at full
resolution. Two resize modes:

- **fixed size** (default, ``size=(H, W)``): exactly transformers' ``SegformerImageProcessor`` — a PIL bilinear resize
  of the uint8 RGB image to ``size``, rescale by 1/255, normalize with the ImageNet mean and std. Transformers 5 has two
  backends for it: ``SegformerImageProcessorPil`` (PIL ``Image.resize``, chosen when torchvision is absent) and the
  torchvision one (``torch`` antialiased bilinear on uint8 tensors, the default when torchvision is installed). We match
  the PIL backend bit for bit: the rescale is done as transformers does it (uint8 -> float64 * (1/255) -> float32) and
  the normalization in float32, through a 256-entry lookup table per channel. The torchvision backend differs from PIL
  by +-1 grey level on a small fraction of pixels when downscaling (up to 1/255/std ~ 0.017 after normalization).
- **keep ratio** (``short_side=N``): mmseg's test-time ``Resize(keep_ratio=True)`` followed by the official NVlabs
  ``AlignedResize``: the scale factor is ``min(max_long_side / long, N / short)`` (``N / short`` without a long-side
  limit; the mmseg ADE20K config uses ``img_scale=(2048, 512)``, Cityscapes ``(2048, 1024)``), each side becomes
  ``int(side * scale + 0.5)`` (mmcv ``rescale_size``), then each side is rounded up to a multiple of ``size_divisor``.
  The image is resized once, straight to that final size, with PIL bilinear; the official code resizes twice with
  OpenCV (keep-ratio, then align), and OpenCV's bilinear does not antialias, so its pixel values differ slightly.

Orientation: every input kind is taken upright as an image viewer shows it. A file (``load_image``) and a PIL image
that carries an EXIF orientation tag (as ``Image.open`` of a phone JPEG does) are turned by the tag, as
transformers' ``load_image`` does; label maps come back at that upright size. Arrays have no tag and are taken as
they are.

``postprocess`` is transformers' ``post_process_semantic_segmentation``: each image's logits are upsampled on their
own with bilinear interpolation (align_corners=False) to the target size, then argmax over the classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segformer_fast.core.fileio import apply_exif_orientation, load_image, to_rgb

#: ImageNet statistics for pixel values in [0, 1] (transformers' IMAGENET_DEFAULT_MEAN / STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Image.Image | np.ndarray | str | os.PathLike


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise ValueError(f"{what} must be an int or a (height, width) pair, got {size!r}")
    return _positive_int(size[0], f"{what} height"), _positive_int(size[1], f"{what} width")


def output_size(
    height: int,
    width: int,
    size: int | tuple[int, int] = (512, 512),
    short_side: int | None = None,
    max_long_side: int | None = None,
    size_divisor: int | None = 32,
) -> tuple[int, int]:
    """The (H, W) that ``preprocess`` resizes an image of ``height`` x ``width`` to, with the same arguments.

    Without ``short_side`` that is ``size``. With it (keep-ratio mode), following mmcv ``rescale_size`` and the
    official ``AlignedResize``::

        scale = min(max_long_side / max(h, w), short_side / min(h, w))   # short_side / min(h, w) without a limit
        h', w' = int(h * scale + 0.5), int(w * scale + 0.5)
        H, W   = ceil(h' / size_divisor) * size_divisor, ceil(w' / size_divisor) * size_divisor

    (sides are kept at least 1 before the rounding up; ``size_divisor`` None or 1 leaves them as they are).
    """
    height = _positive_int(height, "image height")
    width = _positive_int(width, "image width")
    if short_side is None:
        if max_long_side is not None:
            raise ValueError("max_long_side only applies in keep-ratio mode: pass short_side as well")
        return _pair(size, "size")
    short_side = _positive_int(short_side, "short_side")
    scale = short_side / min(height, width)
    if max_long_side is not None:
        max_long_side = _positive_int(max_long_side, "max_long_side")
        if max_long_side < short_side:
            raise ValueError(f"max_long_side must be >= short_side, got {max_long_side} < {short_side}")
        scale = min(max_long_side / max(height, width), scale)
    new_h = max(1, int(height * scale + 0.5))
    new_w = max(1, int(width * scale + 0.5))
    if size_divisor is not None:
        divisor = _positive_int(size_divisor, "size_divisor")
        new_h = -(-new_h // divisor) * divisor
        new_w = -(-new_w // divisor) * divisor
    return new_h, new_w


def as_rgb_image(image: ImageInput, index: int) -> Image.Image:
    """One input as an 8-bit RGB PIL image; ``index`` names it in error messages."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        # upright as a viewer shows it, the same rule as for a path (load_image) and transformers' load_image
        return to_rgb(apply_exif_orientation(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image {index}: expected a uint8 array, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            if 0 in image.shape:
                raise ValueError(f"image {index}: empty image of shape {image.shape}")
            return Image.fromarray(np.ascontiguousarray(image), "L").convert("RGB")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image {index}: expected an (H, W, 3) RGB or (H, W) grayscale uint8 array, got shape {image.shape}"
            )
        if 0 in image.shape:
            raise ValueError(f"image {index}: empty image of shape {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    raise TypeError(
        f"image {index}: expected a PIL image, a uint8 numpy array or a path, got {type(image).__name__}"
    )


def _normalization_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3 * 256,) float32: entry c * 256 + v is the normalized value of grey level v in channel c.

    Computed the way transformers' PIL backend computes each pixel: float64 v * (1/255), cast to float32, then
    (x - mean) / std in float32, so looking the table up gives bit-identical results.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return torch.from_numpy(((levels[None, :] - mean32) / std32).astype(np.float32).reshape(-1))


def preprocess(
    images: ImageInput | Sequence[ImageInput],
    size: int | tuple[int, int] = (512, 512),
    short_side: int | None = None,
    max_long_side: int | None = None,
    size_divisor: int | None = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    return_sizes: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images -> normalized ``pixel_values`` of shape (B, 3, H, W) on ``device`` in ``dtype``.

    ``images``: a PIL image (any mode; converted to RGB), an (H, W, 3) RGB or (H, W) grayscale uint8 array, a path,
    or a list of those. Fixed-size mode (default) resizes to ``size`` = (H, W) like transformers'
    ``SegformerImageProcessor``; keep-ratio mode (``short_side`` given; ``size`` is then ignored) follows mmseg and the
    official ``AlignedResize`` (see the module docstring and ``output_size``). All images of a list must come out
    the same size. ``mean``/``std`` are for pixel values in [0, 1]. The values are computed in float32 (bit-identical
    to transformers) and cast to ``dtype`` at the end.

    With ``return_sizes=True`` returns ``(pixel_values, sizes)``, ``sizes`` being each input's original (H, W), which
    is what ``postprocess`` needs to produce full-resolution label maps.
    """
    if isinstance(images, (list, tuple)):
        batch = list(images)
        if not batch:
            raise ValueError("expected at least one image, got an empty list")
    else:
        batch = [images]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    table = _normalization_table(mean, std)

    pil_images = [as_rgb_image(image, i) for i, image in enumerate(batch)]
    original_sizes = [(im.height, im.width) for im in pil_images]
    targets = [output_size(h, w, size, short_side, max_long_side, size_divisor) for h, w in original_sizes]
    if len(set(targets)) > 1:
        listed = ", ".join(
            f"image {i}: {h}x{w} -> {t[0]}x{t[1]}" for i, ((h, w), t) in enumerate(zip(original_sizes, targets))
        )
        raise ValueError(
            "all images of a batch must be resized to the same size, but they differ (H x W): "
            f"{listed}; preprocess them in separate batches"
        )
    target_h, target_w = targets[0]

    resized = np.empty((len(pil_images), target_h, target_w, 3), dtype=np.uint8)
    for i, im in enumerate(pil_images):
        resized[i] = np.asarray(im.resize((target_w, target_h), Image.BILINEAR))

    levels = torch.from_numpy(resized).to(device).permute(0, 3, 1, 2)
    offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=levels.device).view(1, 3, 1, 1)
    pixel_values = table.to(levels.device)[levels.int() + offsets].to(dtype).contiguous()
    if return_sizes:
        return pixel_values, original_sizes
    return pixel_values


def _target_sizes(sizes, batch: int) -> list[tuple[int, int]]:
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    if (
        isinstance(sizes, Sequence)
        and len(sizes) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes)
    ):
        return [_pair(tuple(sizes), "target size")] * batch
    if not isinstance(sizes, Sequence) or isinstance(sizes, str):
        raise ValueError(f"sizes must be one (H, W) pair or a list of them, got {sizes!r}")
    if len(sizes) != batch:
        raise ValueError(f"expected {batch} target sizes (one per image of the batch), got {len(sizes)}")
    pairs = []
    for i, s in enumerate(sizes):
        if not isinstance(s, Sequence) or isinstance(s, str) or len(s) != 2:
            raise ValueError(f"target size {i} must be an (H, W) pair, got {s!r}")
        pairs.append(_pair(tuple(s), f"target size {i}"))
    return pairs


def postprocess(
    logits: torch.Tensor, sizes: tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """Logits (B, K, h, w) -> label maps: bilinear upsample (align_corners=False) to the target size, then argmax.

    ``sizes``: one (H, W) for every image, a list of B (H, W) pairs (or a (B, 2) tensor), or None to take the argmax
    at the logits' own resolution. Returns an int64 tensor (B, H, W) when every image has the same target size, else
    a list of B tensors (H_i, W_i). Each image is upsampled on its own, exactly as transformers'
    ``post_process_semantic_segmentation`` does, so the labels are identical to it.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (B, K, h, w), got {logits.dim()} dimensions {tuple(logits.shape)}")
    if 0 in logits.shape:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    batch = logits.shape[0]
    if sizes is None:
        return logits.argmax(dim=1)
    targets = _target_sizes(sizes, batch)
    labels = []
    for i, target in enumerate(targets):
        upsampled = F.interpolate(logits[i : i + 1], size=target, mode="bilinear", align_corners=False)
        labels.append(upsampled[0].argmax(dim=0))
    if len(set(targets)) == 1:
        return torch.stack(labels)
    return labels
