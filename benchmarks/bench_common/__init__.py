"""The benchmarks' shared harness. Scripts in benchmarks/ ``import bench_common`` (their folder is on the path when
they run; the tests put it there through pyproject.toml's ``pythonpath``); the package itself (``segformer_fast``)
comes from the installation. Nothing here is installed.

- ``harness``: timing (CUDA events / wall clock, warm-up, median, percentiles; ``triton.testing.do_bench`` and
  ``do_bench_cudagraph`` for kernels), peak memory, device names, the CPU's ISA, versions, argument types, results
  JSON (atomic writes, merging) and console / markdown tables;
- ``model``: what the model benchmark shares with other scripts: named resolutions, the paper's numbers, inputs,
  the timing protocol, counted multiply-adds, the results table and its legend.
"""

from .harness import *  # noqa: F403
from .harness import __all__ as _harness_all
from .model import *  # noqa: F403
from .model import __all__ as _model_all

__all__ = [*_harness_all, *_model_all]
