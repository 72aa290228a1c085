"""The reference model and its checkpoints: variants (``config``), checkpoint key names (``key_families``), checkpoint
files, hub ids, a checkpoint's class count and transformers' models (``checkpoints``), the reference ``Segformer``
(``segformer``).

Imports from the project: core.
"""
