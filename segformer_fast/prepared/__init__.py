"""Weights prepared once for the fast paths: weight dataclasses and ``prepare_*`` (``weights``), the exact decoder fold
(``decoder_fold``). Plain tensors in, plain tensors out.

Imports from the project: nothing.
"""
