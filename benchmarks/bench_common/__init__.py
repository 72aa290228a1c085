"""The benchmarks' shared harness. Scripts in benchmarks/ ``import bench_common`` (their folder is on the path when
they run; the tests put it there through pyproject.toml's ``pythonpath``); the package itself (``segformer_fast``)
comes from the installation. Nothing here is installed.

- ``harness``: timing (CUDA events / wall clock, warm-up, median, percentiles; ``triton.testing.do_bench`` and
  ``do_bench_cudagraph`` for kernels), peak memory, device names, the CPU's ISA, versions, argument types, results
  JSON (atomic writes, merging) and console / markdown tables;
- ``model``: what the model benchmark shares with other scripts: named resolutions, the paper's numbers, defaults,
  inputs, counted multiply-adds, result rows;
- ``table``: the model benchmark's results table (console and markdown), its footnotes and legend;
- ``protocol``: how the model benchmark times its runners (interleaved or row by row);
- ``agreement``: label agreement of a runner with the fp32 reference model.
"""

from .agreement import *  # noqa: F403
from .agreement import __all__ as _agreement_all
from .harness import *  # noqa: F403
from .harness import __all__ as _harness_all
from .model import *  # noqa: F403
from .model import __all__ as _model_all
from .protocol import *  # noqa: F403
from .protocol import __all__ as _protocol_all
from .table import *  # noqa: F403
from .table import __all__ as _table_all

__all__ = [*_harness_all, *_model_all, *_table_all, *_protocol_all, *_agreement_all]
