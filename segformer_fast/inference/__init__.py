"""Inference around any forward: transformers' pre/post-processing (``processing``), sliding-window geometry
(``windows``) and slide-mode logits and labels (``slide``), whole / slide / auto segmentation (``segment``), the
peak-memory model (``memory``).

Imports from the project: model, core.
"""
