"""segformer-fast: a fast, numerically checked SegFormer inference engine for PyTorch.

    import segformer_fast
    model = segformer_fast.Segformer.from_pretrained("path/or/hub-id")
    pixel_values = segformer_fast.preprocess(image)
    labels = segformer_fast.postprocess(model(pixel_values), (image.height, image.width))
    engine = segformer_fast.optimize(model)  # same logits, fused kernels, checked against the reference

The public names are imported on first use (PEP 562), so ``import segformer_fast`` and ``segformer-fast --version``
import no torch; the first name used imports its module (and torch with it).
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Each public name -> the module that defines it.
_PUBLIC = {
    "Segformer": "segformer_fast.model.segformer",
    "SegformerConfig": "segformer_fast.model.config",
    "SegformerEngine": "segformer_fast.engine.engine",
    "VerificationError": "segformer_fast.engine.engine",
    "optimize": "segformer_fast.engine.engine",
    "ExportVerificationError": "segformer_fast.export.verify",
    "export_onnx": "segformer_fast.export.onnx",
    "export_program": "segformer_fast.export.program",
    "load_program": "segformer_fast.export.program",
    "estimate_peak_memory_bytes": "segformer_fast.inference.memory",
    "postprocess": "segformer_fast.inference.processing",
    "preprocess": "segformer_fast.inference.processing",
}

__all__ = [
    "Segformer",
    "SegformerConfig",
    "SegformerEngine",
    "VerificationError",
    "ExportVerificationError",
    "estimate_peak_memory_bytes",
    "export_onnx",
    "export_program",
    "load_checkpoint",
    "load_program",
    "optimize",
    "postprocess",
    "preprocess",
    "__version__",
]

if TYPE_CHECKING:  # the same names for type checkers and readers; at run time __getattr__ imports them
    from segformer_fast.engine.engine import SegformerEngine, VerificationError, optimize
    from segformer_fast.export.onnx import export_onnx
    from segformer_fast.export.program import export_program, load_program
    from segformer_fast.export.verify import ExportVerificationError
    from segformer_fast.inference.memory import estimate_peak_memory_bytes
    from segformer_fast.inference.processing import postprocess, preprocess
    from segformer_fast.model.config import SegformerConfig
    from segformer_fast.model.segformer import Segformer


def __getattr__(name: str):
    """A public name, imported from its module on first use (and kept here); ``load_checkpoint`` is
    ``Segformer.from_pretrained``: load a checkpoint (folder, weights file or hub id) as a reference Segformer."""
    if name == "load_checkpoint":
        value = __getattr__("Segformer").from_pretrained
    elif name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        raise AttributeError(f"module 'segformer_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted({*globals(), *__all__})
