"""An upload, from the request body to the pixels a replica runs, within the service's limits and without Ray or an
HTTP framework: the body's size, the image part of a ``multipart/form-data`` body, the image's header (its size,
read before a pixel is decoded), the decoded RGB pixels, and the array sent to a model replica.

Every refusal is an :class:`~segformer_fast.serve.api.ApiError` (400 for anything the decoder cannot read, 413 for
anything over ``--max-body-mb`` or ``--max-pixels``); nothing here lets a decoder's own exception through.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from segformer_fast.core.fileio import apply_exif_orientation, to_rgb
from segformer_fast.serve.api import ApiError, SegmentRequest, ServeSettings

Image.init()  # every plugin registered, so that FORMATS holds those this Pillow reads
#: The image formats the service opens (Pillow's names, those this Pillow has); any other (IM, DDS, SPIDER, ...) is
#: "not an image".
FORMATS = tuple(name for name in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "AVIF") if name in Image.OPEN)
#: A multipart body may hold at most this many parts (a file field and a few form fields), each with at most
#: ``MAX_PART_HEADERS`` headers of at most ``MAX_PART_HEADER_BYTES`` bytes; more is refused with 400 at once.
MAX_PARTS = 16
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096
#: Names of the form field taken for the image when no part carries a filename.
IMAGE_FIELDS = ("image", "file")


def body_too_large(settings: ServeSettings) -> ApiError:
    return ApiError(413, f"request body over the limit of {settings.max_body_mb:g} MiB (--max-body-mb)")


def check_declared_length(content_length: str | None, settings: ServeSettings) -> None:
    """413 when the declared body is over the limit (checked before a byte of the body is read)."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise ApiError(400, f"malformed Content-Length {content_length!r}") from None
    if declared > settings.max_body_bytes:
        raise body_too_large(settings)


async def read_body(request, settings: ServeSettings) -> bytes:
    """The body of ``request`` (Starlette's: ``headers``, ``stream()``), refused with 413 as soon as it is known to
    be over the limit (from Content-Length, else while it arrives), before anything is decoded."""
    check_declared_length(request.headers.get("content-length"), settings)
    limit = settings.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(settings)
        chunks.append(chunk)
    return b"".join(chunks)


async def client_gone(request) -> None:
    """Returns once the client of ``request`` (Starlette's, its body read) has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def image_bytes(body: bytes, content_type: str | None) -> bytes:
    """The image's bytes: the body itself, or for ``multipart/form-data`` the first part that is a file (else the
    part named ``image`` or ``file``). 400 for an empty body or a multipart body without an image part."""
    if content_type and content_type.lower().startswith("multipart/"):
        return _multipart_file(body, content_type)
    if not body:
        raise ApiError(400, "empty body: send the image as the request body or as a multipart file field")
    return body


class _Parts:
    """python-multipart's callbacks: the parts' names, filenames and bytes, at most ``MAX_PARTS`` of them. A part's
    body is kept only while it may be the image (a filename, or a field named ``image`` / ``file``)."""

    def __init__(self):
        self.parts: list = []  # (name, filename, bytearray)
        self.header_name = b""
        self.header_value = b""
        self.headers: dict = {}
        self.keep = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.field, "on_header_value": self.value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_done, "on_part_data": self.data}

    def begin(self):
        if len(self.parts) >= MAX_PARTS:
            raise ApiError(400, f"multipart body with more than {MAX_PARTS} parts; send the image as one file field")
        self.headers, self.header_name, self.header_value = {}, b"", b""

    def field(self, data: bytes, start: int, end: int):
        self.header_name += data[start:end]

    def value(self, data: bytes, start: int, end: int):
        self.header_value += data[start:end]

    def header_end(self):
        self.headers[self.header_name.lower()] = self.header_value
        self.header_name, self.header_value = b"", b""

    def headers_done(self):
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name, filename = options.get(b"name"), options.get(b"filename")
        self.keep = filename is not None or (name or b"").decode("latin-1") in IMAGE_FIELDS
        self.parts.append((name, filename, bytearray()))

    def data(self, data: bytes, start: int, end: int):
        if self.keep:
            self.parts[-1][2].extend(data[start:end])


def _multipart_file(body: bytes, content_type: str) -> bytes:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary in its Content-Type")
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks(), max_header_count=MAX_PART_HEADERS,
                                 max_header_size=MAX_PART_HEADER_BYTES)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as error:
        raise ApiError(400, f"malformed multipart body: {error}") from None
    chosen = next((part for part in parts.parts if part[1] is not None), None)
    if chosen is None:
        chosen = next((part for part in parts.parts if (part[0] or b"").decode("latin-1") in IMAGE_FIELDS), None)
    if chosen is None:
        raise ApiError(400, "multipart body without a file part (send the image as a file field named 'image')")
    if not chosen[2]:
        raise ApiError(400, "empty image: the multipart file part holds zero bytes")
    return bytes(chosen[2])


def _over_pixels(width: int, height: int, max_pixels: int) -> ApiError:
    return ApiError(413, f"image of {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                         "(--max-pixels)")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, read without decoding its pixels: an opened (lazy) PIL image of at most ``max_pixels``.

    400 for bytes that are no image format of :data:`FORMATS` or whose header is corrupt; 413 naming
    ``--max-pixels`` for more pixels than that (a decompression bomb is refused here, never decoded)."""
    if not data:
        raise ApiError(400, "empty image: zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:
            raise ApiError(413, f"image of more pixels than the limit of {max_pixels} (--max-pixels)") from None
        except MemoryError:
            raise
        except Exception as error:  # every decoder failure is the upload's problem: Pillow raises many kinds
            if type(error).__name__ == "UnidentifiedImageError":
                raise ApiError(400, "not an image: the body is no image format this server reads (PNG, JPEG, "
                                    "WebP, BMP, TIFF, GIF, AVIF)") from None
            raise ApiError(400, f"corrupt image header: {_reason(error)}") from None
    width, height = opened.size
    if width < 1 or height < 1:
        opened.close()
        raise ApiError(400, f"empty image of {width}x{height} pixels")
    if width * height > max_pixels:
        opened.close()
        raise _over_pixels(width, height, max_pixels)
    return opened


def decode_image(opened: Image.Image) -> Image.Image:
    """The pixels of an image from :func:`open_image`, as 8-bit RGB, upright by its EXIF orientation (as
    ``segment`` reads files). 400 naming the problem for anything the decoder cannot read. An RGB image comes back
    as the opened image itself (its pixels are never copied); any other is converted and the opened one closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened.load()
            image = to_rgb(apply_exif_orientation(opened))
        except MemoryError:
            raise
        except Exception as error:  # truncated, corrupt, or a tag the decoder chokes on: never a 500
            opened.close()
            raise ApiError(400, f"truncated or corrupt image: {_reason(error)}") from None
    if image is not opened:
        opened.close()
    return image


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{text} ({type(error).__name__})" if text else type(error).__name__


def check_work_size(request: SegmentRequest, height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The (H, W) an image of this size runs at; 400 for a resize that cannot be computed, 413 naming
    ``--max-pixels`` when the asked size runs more pixels than that."""
    try:
        target = request.target_size(height, width)
    except ValueError as error:
        raise ApiError(400, str(error)) from None
    if target[0] * target[1] > max_pixels:
        raise ApiError(413, f"the resize asked for runs the model at {target[0]}x{target[1]} = "
                            f"{target[0] * target[1]} pixels, over the limit of {max_pixels} (--max-pixels)")
    return target


def model_input(image: Image.Image, request: SegmentRequest, target: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8, what a replica runs: for whole mode the image already resized to ``target`` exactly as
    ``preprocess`` resizes it (bilinear, so the replica's labels equal ``engine.segment``'s), else the image."""
    if request.mode == "whole" and (image.height, image.width) != tuple(target):
        image = image.resize((target[1], target[0]), Image.BILINEAR)
    return np.asarray(image)
