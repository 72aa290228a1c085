"""What the service does with a request, without Ray or an HTTP framework: the settings, the query parameters and
the outputs (label PNG, overlay PNG, JSON summary). Every refusal is an :class:`ApiError` carrying the HTTP status
and a message for the client; the upload itself (body, multipart, image) is ``serve.uploads``'.

Nothing here takes a file path from a request or unpickles anything: a request is bytes and query strings.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from segformer_fast.inference.processing import output_size
from segformer_fast.inference.segment import MODES
from segformer_fast.render.images import label_image
from segformer_fast.render.palettes import DATASET_CLASS_NAMES, overlay

OUTPUTS = ("labels", "overlay", "json", "overlay_json")
#: The query parameters ``POST /v1/segment`` takes; any other is refused with 400.
PARAMETERS = ("output", "mode", "size", "short_side", "max_long_side", "timeout_s")
#: What each output kind answers with.
OUTPUT_HELP = {
    "labels": "a palette PNG of class ids, as `segment` writes it (the default)",
    "overlay": "the class colors over the image (PNG)",
    "json": "the classes present: names, colors, pixel counts and shares",
    "overlay_json": "json plus the overlay PNG in base64 (overlay_png): what the page at / asks for",
}
#: Seconds a client is told to wait (``Retry-After``) when the service is over its queue.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the service refuses: ``status`` (4xx / 5xx) and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What ``segformer-fast serve`` was started with (sent to every replica, so plain values only)."""

    model: str
    dtype: str = "fp32"
    device: str = "auto"
    replicas: int = 1
    cpus_per_replica: float = 1.0
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_body_mb: float = 20.0
    max_pixels: int = 4096 * 4096
    max_queue: int = 64
    request_timeout_s: float = 60.0
    max_pixels_in_flight: int | None = None
    idle_timeout_s: float = 15.0
    #: a dataset whose class names to show ("ade20k", "cityscapes"); None: the checkpoint's own
    class_names: str | None = None

    def __post_init__(self):
        for name in ("replicas", "max_batch_size", "max_pixels", "max_queue", "max_pixels_in_flight"):
            value = getattr(self, name)
            if value is None and name == "max_pixels_in_flight":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("cpus_per_replica", "max_body_mb", "request_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value!r}")
        if not (isinstance(self.batch_wait_ms, (int, float)) and math.isfinite(self.batch_wait_ms)
                and self.batch_wait_ms >= 0):
            raise ValueError(f"batch-wait-ms must be a number >= 0, got {self.batch_wait_ms!r}")
        if self.class_names is not None and self.class_names not in DATASET_CLASS_NAMES:
            raise ValueError(f"class-names must be one of {', '.join(sorted(DATASET_CLASS_NAMES))}, got "
                             f"{self.class_names!r}")
        if self.pixels_in_flight < 2 * self.max_pixels:
            raise ValueError(f"max-pixels-in-flight must be at least twice --max-pixels ({2 * self.max_pixels}: one "
                             f"image and its work size), got {self.pixels_in_flight}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def pixels_in_flight(self) -> int:
        """Most pixels (each request's image plus the size it runs at) decoded or running at once: the given
        ``--max-pixels-in-flight``, else four times ``--max-pixels``."""
        return self.max_pixels_in_flight if self.max_pixels_in_flight is not None else 4 * self.max_pixels


@dataclasses.dataclass(frozen=True)
class SegmentRequest:
    """A checked ``POST /v1/segment`` query: the output kind, the mode, ``segment``'s resize arguments and the
    seconds the client is willing to wait (at most the server's request timeout)."""

    output: str = "labels"
    mode: str = "whole"
    resize: tuple = (("size", (512, 512)),)
    timeout_s: float = 60.0

    def resize_arguments(self) -> dict:
        return dict(self.resize)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) ``engine.segment`` resizes an image of this size to (its own size with ``size`` None)."""
        resize = self.resize_arguments()
        if resize.get("short_side") is not None:
            return output_size(height, width, short_side=resize["short_side"],
                               max_long_side=resize.get("max_long_side"))
        if resize.get("size") is None:
            return height, width
        return output_size(height, width, resize["size"])


def _int_parameter(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ApiError(400, f"{name} must be a positive integer, got {value!r}")
    return number


def _size_parameter(value: str):
    """``size``: ``N`` (N x N), ``HxW`` or ``H,W``, or ``none`` (the image's own size)."""
    text = value.strip().lower()
    if text in ("none", "original"):
        return None
    parts = text.replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ApiError(400, f"size must be N, HxW or none, got {value!r}")
    return _int_parameter("size height", parts[0]), _int_parameter("size width", parts[1])


def parse_query(items, settings: ServeSettings) -> SegmentRequest:
    """``items``: the query's (name, value) pairs. ApiError 400 for an unknown or repeated parameter, an unknown
    output or mode, or a malformed size; the resize follows ``segformer-fast segment`` (default 512 x 512 in whole
    mode, the image's own size in slide and auto modes)."""
    query: dict = {}
    for name, value in items:
        if name not in PARAMETERS:
            raise ApiError(400, f"unknown parameter {name!r}; known: {', '.join(PARAMETERS)}")
        if name in query:
            raise ApiError(400, f"parameter {name!r} given more than once")
        query[name] = value
    output = query.get("output", "labels")
    if output not in OUTPUTS:
        raise ApiError(400, f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    mode = query.get("mode", "whole")
    if mode not in MODES:
        raise ApiError(400, f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    short_side = _int_parameter("short_side", query["short_side"]) if "short_side" in query else None
    max_long_side = _int_parameter("max_long_side", query["max_long_side"]) if "max_long_side" in query else None
    if short_side is not None:
        if "size" in query:
            raise ApiError(400, "give size or short_side, not both")
        if max_long_side is not None and max_long_side < short_side:
            raise ApiError(400, f"max_long_side must be >= short_side, got {max_long_side} < {short_side}")
        resize = (("short_side", short_side), ("max_long_side", max_long_side), ("size", None))
    else:
        if max_long_side is not None:
            raise ApiError(400, "max_long_side needs short_side")
        if "size" in query:
            size = _size_parameter(query["size"])
        else:
            size = (512, 512) if mode == "whole" else None
        resize = (("size", size),)
    timeout_s = settings.request_timeout_s
    if "timeout_s" in query:
        try:
            asked = float(query["timeout_s"])
        except ValueError:
            asked = math.nan
        if not (math.isfinite(asked) and asked > 0):
            raise ApiError(400, f"timeout_s must be a positive number of seconds, got {query['timeout_s']!r}")
        timeout_s = min(asked, settings.request_timeout_s)
    return SegmentRequest(output=output, mode=mode, resize=resize, timeout_s=timeout_s)


def hex_color(color) -> str:
    return "#" + "".join(f"{int(channel):02x}" for channel in color)


def labels_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """The label map as ``segment`` writes it (a palette PNG of class ids; 16-bit grayscale above 256 classes)."""
    buffer = io.BytesIO()
    label_image(labels, palette).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image: Image.Image, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> bytes:
    """The labels' colors over the image, as ``segment``'s overlay (a fast PNG compression: same pixels)."""
    buffer = io.BytesIO()
    overlay(image, labels, palette, alpha=alpha).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def summary(labels: np.ndarray, names: list[str], palette: np.ndarray) -> dict:
    """The JSON output: the image size and the classes present, most pixels first, with name, color, pixel count
    and share of the pixels."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=len(names))
    total = int(labels.size)
    present = sorted((int(index) for index in np.flatnonzero(counts)), key=lambda index: (-int(counts[index]), index))
    return {
        "height": int(labels.shape[0]),
        "width": int(labels.shape[1]),
        "classes": [{"id": index, "name": names[index], "color": hex_color(palette[index]),
                     "pixels": int(counts[index]), "share": int(counts[index]) / total} for index in present],
    }


def render(output: str, image: Image.Image | None, labels: np.ndarray, names: list[str],
           palette: np.ndarray) -> tuple[bytes, str]:
    """(body, media type) of an output kind: ``labels`` / ``overlay`` PNGs, ``json`` (:func:`summary`), or
    ``overlay_json``, the summary with the overlay PNG in it (base64, ``overlay_png``: the page's one request)."""
    if output == "labels":
        return labels_png(labels, palette), "image/png"
    if output == "overlay":
        return overlay_png(image, labels, palette), "image/png"
    result = summary(labels, names, palette)
    if output == "overlay_json":
        result["overlay_png"] = base64.b64encode(overlay_png(image, labels, palette)).decode("ascii")
    return json.dumps(result).encode("utf-8"), "application/json"


def public_model_name(model: str) -> str:
    """What ``GET /v1/model`` says was loaded: a hub id as given, a local checkpoint by its file or folder name
    only (never a path on the server)."""
    path = Path(model)
    if path.exists() or path.is_absolute() or model.startswith(("~", ".")):
        return path.name or model.rstrip("/").rsplit("/", 1)[-1]
    return model
