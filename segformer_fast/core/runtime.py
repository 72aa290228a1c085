"""What PyTorch runs on: compute dtypes by name, devices by name, out-of-memory errors.

The bottom layer: imports torch only. Every module that parses a dtype or a device name, or asks whether an
error means "out of memory", uses these, so the accepted spellings and messages are the same everywhere.
"""

import torch

#: The compute dtypes every path supports, by their short names (the CLI's and the benchmarks' spelling).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The same dtypes, as a tuple for membership checks.
COMPUTE_DTYPES = tuple(DTYPES.values())
#: Widest stage whose Triton flash SR attention fuses the output projection (kernels.sr_attention; accumulator
#: BLOCK_M x 256 in fp32); wider stages write the attention output to a temporary first. The kernels and the
#: memory model (inference.memory) read it here.
MAX_FUSED_OUT_CHANNELS = 256
#: Long names accepted wherever a short one is.
_DTYPE_ALIASES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(value) -> torch.dtype:
    """A compute dtype from a torch dtype or a name ("fp32", "float16", ...); ValueError naming the choices."""
    if isinstance(value, torch.dtype):
        if value not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {value}")
        return value
    if isinstance(value, str):
        key = value.lower()
        if key in DTYPES:
            return DTYPES[key]
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or float32, float16, bfloat16), got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a compute dtype: torch.float16 -> "fp16"."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def resolve_device(name) -> torch.device:
    """``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a checked device.

    ValueError for an unknown name, another device type, CUDA where none is available, or an index past the
    visible devices.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; valid: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors, ``MemoryError`` and PyTorch's CPU allocation failures."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return "out of memory" in message or "can't allocate memory" in message
    return False


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): there bf16 is the CPU engine's fast dtype
    (oneDNN's bf16 GEMMs and the extension's bf16 attention); elsewhere bf16 is emulated and slower than fp32."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    capabilities = get_capabilities() if get_capabilities is not None else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
