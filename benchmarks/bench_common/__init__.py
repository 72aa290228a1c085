"""The benchmarks' shared harness. Scripts in benchmarks/ ``import bench_common`` (their folder is on the path when
they run; the tests put it there through pyproject.toml's ``pythonpath``); the package itself (``segformer_fast``)
comes from the installation. Nothing here is installed.

- ``harness``: timing (CUDA events / wall clock, warm-up, median, percentiles; ``triton.testing.do_bench`` and
  ``do_bench_cudagraph`` for kernels), peak memory, device names, the CPU's ISA, versions, results JSON (atomic
  writes, merging);
- ``arguments``: argument types (lists, positive numbers, devices); ``text_tables``: console and markdown tables;
- ``runners``: the PyTorch runners of the model benchmark (engine, reference, transformers, torch.compile);
  ``runtimes``: ONNX Runtime, OpenVINO (fp32, bf16, int8 through NNCF) and TensorRT runners;
- ``model``: what the model benchmark shares with other scripts: named resolutions, the paper's numbers, defaults,
  inputs, counted multiply-adds, result rows;
- ``table``: the model benchmark's results table (console and markdown), its footnotes and legend;
- ``protocol``: how the model benchmark times its runners (interleaved or row by row);
- ``agreement``: label agreement of a runner with the fp32 reference model.

Imported by name, not re-exported here: ``local_server`` (a ``segformer-fast serve`` process on a free port, for
``bench_serve.py`` and the service's tests) and ``folded_decode`` (the folded decode head on stage features, for
``bench_decoder.py`` and the fold's tests).
"""

from .agreement import *  # noqa: F403
from .agreement import __all__ as _agreement_all
from .arguments import *  # noqa: F403
from .arguments import __all__ as _arguments_all
from .harness import *  # noqa: F403
from .harness import __all__ as _harness_all
from .model import *  # noqa: F403
from .model import __all__ as _model_all
from .protocol import *  # noqa: F403
from .protocol import __all__ as _protocol_all
from .table import *  # noqa: F403
from .table import __all__ as _table_all
from .text_tables import *  # noqa: F403
from .text_tables import __all__ as _text_tables_all

__all__ = [*_harness_all, *_arguments_all, *_text_tables_all, *_model_all, *_table_all, *_protocol_all,
           *_agreement_all]
