"""segformer-fast: a fast, numerically checked SegFormer inference engine for PyTorch.

    import segformer_fast
    model = segformer_fast.Segformer.from_pretrained("path/or/hub-id")
    pixel_values = segformer_fast.preprocess(image)
    labels = segformer_fast.postprocess(model(pixel_values), (image.height, image.width))
"""

from .checkpoints import load as load_checkpoint
from .config import SegformerConfig
from .model import Segformer
from .processing import postprocess, preprocess

__version__ = "0.1.0"
__all__ = ["Segformer", "SegformerConfig", "load_checkpoint", "postprocess", "preprocess", "__version__"]
