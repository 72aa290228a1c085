"""Build settings of the segformer_fast._C extension, kept apart from setup.py so tests can import them.

Plain Python: imports neither torch nor setuptools.
"""

import re

#: The CUDA code needs sm_80+ (bf16 WMMA in fused_decode.cu); nvcc 13 also refuses anything below sm_75.
MIN_CUDA_ARCH = (8, 0)
#: A100 and H100/H200 as machine code, plus PTX of the newest so later GPUs can JIT-compile it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
#: Torch releases from this one on build their C++ API with C++20 and their headers expect it.
FIRST_TORCH_WITH_CXX20 = (2, 10)

_ARCH_PATTERN = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")


def filter_cuda_arch_list(arch_list: str | None) -> tuple[str, list[str]]:
    """The architectures to build for, from a ``TORCH_CUDA_ARCH_LIST`` value (None or blank: the default).

    arch_list: entries such as "8.0", "9.0a" or "9.0+PTX", separated by ";" or spaces.
    Returns (the kept entries joined by ";", the dropped entries): entries below sm_80 are dropped.
    ValueError for an entry that is not of that form, or when no entry is left.
    """
    if arch_list is None or not arch_list.strip():
        arch_list = DEFAULT_CUDA_ARCH_LIST
    entries = [entry for entry in re.split(r"[;\s]+", arch_list) if entry]
    kept, dropped = [], []
    for entry in entries:
        match = _ARCH_PATTERN.match(entry)
        if match is None:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form MAJOR.MINOR[a][+PTX] (e.g. 8.0 or 9.0+PTX); "
                f"got TORCH_CUDA_ARCH_LIST={arch_list!r}"
            )
        if (int(match.group(1)), int(match.group(2))) >= MIN_CUDA_ARCH:
            kept.append(entry)
        else:
            dropped.append(entry)
    if not kept:
        raise ValueError(
            f"TORCH_CUDA_ARCH_LIST={arch_list!r} has no architecture >= {MIN_CUDA_ARCH[0]}.{MIN_CUDA_ARCH[1]}: "
            f"the CUDA kernels need sm_80 or newer (e.g. TORCH_CUDA_ARCH_LIST=\"{DEFAULT_CUDA_ARCH_LIST}\"), or build "
            "the C++ part only with SEGFORMER_FAST_NO_CUDA=1"
        )
    return ";".join(kept), dropped


def openmp_flags(platform: str) -> list[str]:
    """Compiler and linker flags that make ``at::parallel_for`` in the extension's CPU kernels run in parallel.

    ATen's ``parallel_for`` is a header template whose OpenMP branch is compiled only under ``-fopenmp``; without
    it every CPU kernel of the extension runs on one thread. On Linux the extension then needs ``libgomp.so.1``,
    which is the OpenMP runtime torch itself loads, so the process keeps one thread pool. Elsewhere (macOS clang
    has no -fopenmp by default, MSVC spells it differently) no flag: the kernels run on one thread.
    platform: ``sys.platform``.
    """
    return ["-fopenmp"] if platform.startswith("linux") else []


def cxx_standard(torch_version: str) -> str:
    """The -std value for a torch version string such as "2.13.0+cpu": "c++20" from torch 2.10 on, else "c++17"."""
    match = re.match(r"^(\d+)\.(\d+)", torch_version)
    if match is None:
        raise ValueError(f"torch version must start with MAJOR.MINOR, got {torch_version!r}")
    return "c++20" if (int(match.group(1)), int(match.group(2))) >= FIRST_TORCH_WITH_CXX20 else "c++17"
