"""glibc malloc settings that let CPU inference reuse freed memory instead of faulting in fresh pages.

A SegFormer forward allocates and frees tens of temporaries of 1-128 MiB (stage-1 activations, attention scores).
With glibc's defaults, blocks that large are mmap-ed and unmapped again, or trimmed from the heap's top once freed,
so every call faults its temporaries' pages back in from the kernel, zero-filled: measured on the 2-core AMD EPYC,
B0 at 512² took 52-58 ms a call with the defaults and 42-46 ms with the settings below (benchmarks/NOTES.md).
ONNX Runtime and OpenVINO avoid the same cost with their own memory arenas.

:func:`keep_freed_memory` raises the mmap threshold to 256 MiB (smaller blocks come from the heap) and the trim
threshold to 1 GiB (freed heap memory stays mapped for the next call). Both are process-wide: the process keeps up
to 1 GiB of freed memory mapped. ``optimize`` applies them to CPU engines unless the environment variable
``SEGFORMER_FAST_TUNE_MALLOC`` is ``0``, ``false``, ``no`` or ``off``; elsewhere (musl, macOS, Windows) nothing changes.
"""

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
ENV_VAR = "SEGFORMER_FAST_TUNE_MALLOC"

_applied = None  # None: not tried yet; then True / False


def _glibc_mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: raises AttributeError on musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Apply the settings once per process (see the module docstring); returns whether they are in force.

    Does nothing, and returns False, when ``SEGFORMER_FAST_TUNE_MALLOC`` is 0 / false / no / off (any case) or the C
    library is not glibc.
    """
    global _applied
    if _applied is None:
        _applied = False
        off = os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")
        mallopt = None if off else _glibc_mallopt()
        if mallopt is not None:
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
