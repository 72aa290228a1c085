"""Export of the engine's prepared forward: the graph on export ops (``graph``), ONNX (``onnx``), ``torch.export``
programs (``program``), and the check of a written file (``verify``).

Imports from the project: engine, inference, ops, prepared, model, core.
"""
