"""Helpers every kernel file shares: input checks, the interpreter's dot workaround, the reference dtype.

- ``check_compute_dtype`` / ``check_device`` / ``check_out`` (and ``check_tensor`` from
  ``segformer_fast.prepared.weights``): input validation with messages that carry the expected and the actual values.
- ``upcast_dot``: whether a kernel must feed ``tl.dot`` fp32 operands. The Triton CPU interpreter stores bf16 as
  raw uint16 and multiplies those integers in ``tl.dot``, so under ``TRITON_INTERPRET=1`` bf16 operands are
  upcast (exact: a bf16 x bf16 product fits in fp32) before the dot. On a GPU the flag is always False.
- ``mma``: ``acc + a @ b`` with fp32 accumulation and IEEE fp32 products (fp32 inputs never go through TF32, so
  fp32 results stay within the fp32 tolerance floor of 1e-4).
- ``ref_dtype``: the dtype every ``*_ref`` computes in (the kernels' references are ``segformer_fast.ops.reference``
  run in that dtype).
- ``Launch`` / ``pick_launch`` / ``WAVE_BLOCKS``: every launcher computes its grid and tile sizes in a pure
  function of the shapes (``*_launch``), so a CPU test can count the blocks of every launch the engine makes
  (``tests/kernels/test_launch_grids.py``). A launch should have at least a wave of blocks (one per SM of an
  H100/H200: 132); the functions take the largest tiles that give a wave, and where even the smallest tiles
  cannot, the most blocks there are and the reason in ``Launch.reason``.
"""

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from segformer_fast.core.runtime import COMPUTE_DTYPES
from segformer_fast.prepared.weights import check_tensor

#: Streaming multiprocessors of an H100 SXM / H200: a launch with fewer blocks leaves SMs idle.
WAVE_BLOCKS = 132


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher makes it: the grid, the compile-time tile sizes, warps and stages.

    reason: empty when the grid has at least a wave of blocks, else why it cannot have more.
    """

    kernel: str
    grid: tuple
    meta: dict
    num_warps: int
    num_stages: int
    reason: str = ""

    @property
    def blocks(self) -> int:
        return math.prod(self.grid)


def wave_blocks() -> int:
    """The blocks a launch should reach (``WAVE_BLOCKS``, read at call time so tests can lower it)."""
    return WAVE_BLOCKS


def pick_launch(candidates, why_fewer: str = "") -> Launch:
    """The first of ``candidates`` (largest tiles first) with at least a wave of blocks; else the one with the
    most blocks (the first of those), its reason saying that the smallest tiles give no more (plus ``why_fewer``)."""
    candidates = list(candidates)
    wave = wave_blocks()
    for launch in candidates:
        if launch.blocks >= wave:
            return launch
    best = max(candidates, key=lambda launch: launch.blocks)
    reason = f"{best.blocks} blocks at the smallest tiles allowed ({best.meta}), fewer than a wave of {wave}"
    return dataclasses.replace(best, reason=reason + (f": {why_fewer}" if why_fewer else ""))


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands of ``dtype`` must be upcast to fp32 (the interpreter's bf16 dot is wrong)."""
    return interpreting() and dtype == torch.bfloat16


def check_compute_dtype(name, tensor):
    """Kernels take fp32, fp16 or bf16 activations (fp32 accumulation inside)."""
    if tensor.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {tensor.dtype}")


def check_device(name, tensor):
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    want = "cpu" if interpreting() else "cuda"
    if tensor.device.type != want:
        hint = "" if interpreting() else " (set TRITON_INTERPRET=1 before importing triton to run on the CPU)"
        raise ValueError(f"{name}: expected a {want} tensor, got device {tensor.device}{hint}")


def check_out(out, shape, like):
    """Return ``out`` after checking it, or a fresh ``torch.empty`` of ``shape`` like ``like``."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_tensor("out", out, shape=shape, dtype=like.dtype, device=like.device)
    return out


def ref_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """The dtype of a ``*_ref``: fp32 (fp64 inputs stay fp64) when ``upcast``, else the input's own dtype."""
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32 (IEEE products for fp32 operands; see ``upcast_dot`` for UPCAST)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")
