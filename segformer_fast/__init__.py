"""segformer-fast: a fast, numerically checked SegFormer inference engine for PyTorch."""

__version__ = "0.1.0"
