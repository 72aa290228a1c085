"""segformer-fast: a fast, numerically checked SegFormer inference engine for PyTorch.

    import segformer_fast
    model = segformer_fast.Segformer.from_pretrained("path/or/hub-id")
    pixel_values = segformer_fast.preprocess(image)
    labels = segformer_fast.postprocess(model(pixel_values), (image.height, image.width))
    engine = segformer_fast.optimize(model)  # same logits, fused kernels, checked against the reference
"""

from segformer_fast.engine.engine import SegformerEngine, VerificationError, optimize
from segformer_fast.export.onnx import export_onnx
from segformer_fast.export.program import export_program, load_program
from segformer_fast.export.verify import ExportVerificationError
from segformer_fast.inference.memory import estimate_peak_memory_bytes
from segformer_fast.inference.processing import postprocess, preprocess
from segformer_fast.model.config import SegformerConfig
from segformer_fast.model.segformer import Segformer

#: Load a checkpoint (folder, weights file or hub id) as a reference Segformer.
load_checkpoint = Segformer.from_pretrained

__version__ = "0.1.0"
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
