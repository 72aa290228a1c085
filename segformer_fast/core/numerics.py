"""The tolerance rule and the TF32 scope of fp32, for ``optimize(verify=True)`` (the tests and benchmarks use them too).

The tolerance rule (docs/DESIGN.md section 5, as flash-attention uses it): the error of a fused path in a dtype may be
at most twice the error of eager PyTorch in the same dtype, plus a floor relative to the largest reference value.
Errors are measured against a reference computed in fp64 or fp32.

"fp32" means IEEE fp32 on both sides: :func:`no_tf32` turns TensorFloat-32 off for cuDNN convolutions and cuBLAS
matmuls (PyTorch's default lets cuDNN convolutions run in TF32 on Ampere and later, which alone puts a reference
about 5x past the fp32 floor), and restores the caller's flags afterwards.
"""

import contextlib
import threading

import torch

#: Floors of the tolerance rule, relative to max |reference|.
TOLERANCE_FLOORS = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


_tf32_lock = threading.Lock()
_tf32_depth = 0  # how many no_tf32 scopes are open, over all threads
_tf32_saved = None  # the caller's flags, read when the first scope opened


def _read_tf32_flags() -> tuple:
    """The caller's TF32 settings, through whichever API they were set with.

    PyTorch >= 2.9 raises when the legacy flags are read after the new ``fp32_precision`` API set them differently,
    so a failing legacy read means the caller uses the new API (and then we must too).
    """
    try:
        return ("legacy", torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:
        return ("new", torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)


def _write_tf32_flags(flags: tuple) -> None:
    api, conv, matmul = flags
    if api == "legacy":
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)
    else:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul


def _ieee_flags(api: str) -> tuple:
    return (api, False, "highest") if api == "legacy" else (api, "ieee", "ieee")


@contextlib.contextmanager
def no_tf32():
    """TF32 off for cuDNN convolutions and cuBLAS matmuls inside; the caller's flags restored on exit, error or not.

    The flags are process-wide: scopes may nest and overlap across threads (the first to open saves the caller's
    flags, the last to close restores them), and other threads' fp32 work also runs without TF32 meanwhile.
    """
    global _tf32_depth, _tf32_saved
    with _tf32_lock:
        if _tf32_depth == 0:
            _tf32_saved = _read_tf32_flags()
            _write_tf32_flags(_ieee_flags(_tf32_saved[0]))
        _tf32_depth += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_depth -= 1
            if _tf32_depth == 0:
                _write_tf32_flags(_tf32_saved)
                _tf32_saved = None


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over all elements, computed in fp64; NaN anywhere gives inf."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: got {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    if not torch.isfinite(diff).all():
        return float("inf")
    return float(diff.max())


def tolerance(reference: torch.Tensor, dtype: torch.dtype, eager_error: float = 0.0) -> float:
    """Allowed max abs error for a result in ``dtype``: 2 x eager_error + floor(dtype) x max |reference|."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return 2.0 * eager_error + TOLERANCE_FLOORS[dtype] * max(scale, 1e-30)
