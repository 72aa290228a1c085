"""File input/output: atomic writes, image loading and image discovery.

Atomic writes: everything the package writes goes to a hidden temporary file in the destination folder first and is
moved onto the final name with ``os.replace`` only once it is complete, so a reader never sees a half-written file
under the final name and a failed write leaves nothing behind. (This protects against errors and concurrent readers;
it does not fsync, so it says nothing about power loss.)

Image loading: ``load_image`` always returns a fully decoded 8-bit RGB ``PIL.Image``, whatever the file holds
(grayscale, gray + alpha, RGBA, palette, 16-bit, CMYK, ...), with the EXIF orientation applied as transformers'
``load_image`` and OpenCV's ``imread`` do. Unreadable files raise ``ValueError`` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File name extensions (lower case) that ``find_images`` picks up inside folders.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
)

#: PIL modes holding one channel of 16-bit samples (or wider integers), scaled to 8 bits by ``load_image``.
_WIDE_INTEGER_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; it replaces ``path`` when the block finishes without an exception.

    The temporary file is created (empty, with the usual umask-governed permissions) in the same folder as ``path``,
    under a hidden name with the same suffix, so ``PIL.Image.save`` and similar writers pick the right format from
    it. On success it is moved onto ``path`` with ``os.replace`` (atomic on POSIX and Windows within one file
    system); on any exception it is removed and the exception propagates, so ``path`` is either untouched or
    complete::

        with atomic_path("out/mask.png") as tmp:
            image.save(tmp)
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
    while True:
        tmp = parent / f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_path``)."""
    atomic_write_bytes(path, text.encode(encoding))


def _scale_16bit_to_8bit(samples: np.ndarray) -> np.ndarray:
    """Map 16-bit samples (0..65535; wider integers are clipped to that range) to 0..255 by rounding v * 255 / 65535.

    v * 255 / 65535 = v / 257, and round(v / 257) = (v + 128) // 257 for the integers in range.
    """
    wide = np.clip(samples.astype(np.int64), 0, 65535)
    return ((wide + 128) // 257).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Alpha is dropped without compositing (the color channels are kept as they are); palette images are expanded;
    16-bit and 32-bit integer grayscale is scaled to 8 bits (v * 255 / 65535, rounded) rather than clipped, which is
    what a plain ``convert("L")`` would do; CMYK and other modes use PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_INTEGER_MODES:
        return Image.fromarray(_scale_16bit_to_8bit(np.asarray(image)), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # PIL warns when converting a palette image with transparency straight to RGB; go through RGBA.
        return image.convert("RGBA").convert("RGB")
    if mode == "PA":
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """``image`` turned upright per its EXIF orientation tag; as it is when the EXIF data cannot be parsed."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, KeyError, TypeError, OSError, struct.error):
        return image


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; return it as an 8-bit RGB ``PIL.Image`` (EXIF orientation applied).

    Raises ``FileNotFoundError`` for a missing path, and ``ValueError`` naming the file and the reason for a folder
    or another non-regular file (a named pipe would block the read forever), and when the file is not an image, is
    truncated or corrupt, or cannot be converted to RGB.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"expected an image file, got a folder: {path}")
    reason = _not_regular_reason(path)
    if reason is not None:
        raise ValueError(f"cannot read image {path}: it {reason}")
    try:
        with Image.open(path) as opened:
            opened.load()
            rgb = to_rgb(apply_exif_orientation(opened))
            if rgb is opened:
                rgb = opened.copy()
    except (FileNotFoundError, PermissionError):
        raise
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {path}: not an image file or an unsupported format") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    except (OSError, SyntaxError, ValueError, KeyError, EOFError) as error:
        # PIL reports truncated and corrupt data as OSError ("image file is truncated ...", "Truncated File Read")
        # or SyntaxError (broken PNG chunks), and unsupported conversions as ValueError.
        reason = str(error) or type(error).__name__
        what = "cannot convert it to RGB" if isinstance(error, ValueError) else "truncated or corrupt image data"
        raise ValueError(f"cannot read image {path}: {what} ({reason})") from None
    return rgb


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


#: Names ``atomic_path`` gives its temporaries: "." + stem + "." + 12 hex digits + ".tmp" + suffix.
_TEMPORARY_NAME = re.compile(r"^\..*\.[0-9a-f]{12}\.tmp(\.[^./]*)?$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporaries that an interrupted ``atomic_path`` write left under ``folder``.

    Only files named as ``atomic_path`` names them are removed (a killed process cannot clean up after itself);
    returns the removed paths. Call it only on a folder no other writer is using at the same time.
    """
    removed = []
    for parent, _, filenames in os.walk(folder):
        for name in filenames:
            if _TEMPORARY_NAME.match(name):
                path = Path(parent) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def _not_regular_reason(path: Path) -> str | None:
    """None for a regular file (or a link to one); else why ``path`` cannot be an image file."""
    try:
        mode = path.stat().st_mode
    except OSError as error:  # a dangling link, a symbolic-link loop, no permission to look
        return f"cannot be opened ({error.strerror or type(error).__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "is a named pipe, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def find_images(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    exclude: Iterable[str | os.PathLike] = (),
    skipped: list | None = None,
    ignored: list | None = None,
) -> list[Path]:
    """Expand files and folders into a list of image files.

    ``inputs`` is one path or several. A named file is included whatever its extension. A folder is searched
    recursively (symbolic links to folders are not followed) for files whose extension, ignoring case, is in
    ``IMAGE_EXTENSIONS``; hidden files and folders (names starting with ".", such as the temporaries of
    ``atomic_path``) are skipped, and so is everything under a folder in ``exclude`` (an output folder inside an
    input folder is never read as input). Only regular files (or links to them) are images: named pipes, sockets,
    devices, dangling links and link loops are left out, each appended to ``skipped`` as ``(path, reason)`` when a
    list is given. Each folder's images are sorted by path; the inputs keep the order they were given in, and a
    file reached twice is listed once. Files found in a folder without an image extension (not hidden) are appended
    to ``ignored`` when a list is given, so a caller can say what it left out. A missing input raises
    ``FileNotFoundError``. (An ``exclude`` folder that is
    an input folder itself, or holds one, excludes nothing: :func:`check_output_folder` refuses that case.)
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    excluded = [Path(folder).resolve() for folder in exclude]
    found: list[Path] = []
    seen: set[Path] = set()

    def is_excluded(path: Path) -> bool:
        resolved = Path(os.path.realpath(path))  # realpath, unlike Path.resolve, does not raise on a link loop
        return any(resolved == folder or resolved.is_relative_to(folder) for folder in excluded)

    def add(path: Path) -> None:
        reason = _not_regular_reason(path)
        if reason is not None:
            if skipped is not None:
                skipped.append((path, reason))
            return
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(path)

    for item in inputs:
        root = Path(item)
        if root.is_dir():
            in_folder = []
            for folder, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not _is_hidden(d) and not is_excluded(Path(folder) / d)]
                for name in filenames:
                    if _is_hidden(name):
                        continue
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        in_folder.append(Path(folder) / name)
                    elif ignored is not None:
                        ignored.append(Path(folder) / name)
            for path in sorted(in_folder, key=lambda q: q.parts):
                add(path)
        elif root.exists() or root.is_symlink():
            if not is_excluded(root):
                add(root)
        else:
            raise FileNotFoundError(f"input not found: {root}")
    return found


def _closest_existing(path: Path) -> Path:
    """``path`` itself if something is there (a dangling link counts), else its closest existing ancestor."""
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """ValueError when ``out_dir`` cannot hold the outputs, or writing into it would mix outputs with inputs.

    An output folder that exists as a file (or a dangling link) or lies under a file is refused. An output folder
    strictly inside an input folder is fine (:func:`find_images` leaves it out with ``exclude``); the output folder
    being an input folder, or holding one, is refused: a second run would read the first run's outputs as images.
    """
    existing = _closest_existing(Path(out_dir))
    if not existing.is_dir():
        where = "is" if existing == Path(out_dir) else f"lies under {existing}, which is"
        raise ValueError(f"the output folder {out_dir} {where} a file (or a dangling link), not a folder")
    out = Path(out_dir).resolve()
    for item in inputs:
        root = Path(item)
        if not root.is_dir():
            continue
        resolved = root.resolve()
        if resolved == out or resolved.is_relative_to(out):
            raise ValueError(
                f"the output folder {out_dir} is (or holds) the input folder {item}: outputs would be read as inputs "
                "on the next run; choose an output folder outside the inputs, or a subfolder of them"
            )


def check_output_file(path: str | os.PathLike, what: str = "output file") -> None:
    """ValueError unless ``path`` can be written as a file: it must not be a folder, and its closest existing
    ancestor must be a folder (missing parent folders are created by the writer). Call it before the work starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is an existing folder; expected a file name")
    existing = _closest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"cannot write {what} {path}: {existing} is a file (or a dangling link), not a folder")


def check_can_create(folder, what: str) -> None:
    """ValueError unless a file can be created in ``folder`` (or, where it does not exist yet, in its closest
    existing ancestor, where the writer will create it): made before a model is loaded, so that an unwritable
    output is found before the work, not after it. The probe file is removed at once."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".segformer-fast-probe.{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write {what} {folder}: creating a file in {existing} failed "
                         f"({error.strerror or type(error).__name__})") from None
