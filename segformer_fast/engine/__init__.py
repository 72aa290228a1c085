"""``segformer_fast.optimize``: the engine (``engine``), the one prepared forward (``forward``), the ops objects of its
backends (``backends``; ``triton_backend``, the only importer of the Triton kernels, imported lazily) and CUDA
graphs (``graph_cache``).

Imports from the project: kernels, inference, ops, prepared, model, core.
"""
