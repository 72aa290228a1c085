"""The ops the prepared forward runs: one plain-PyTorch reference of each (``reference``), the CPU fast ops on oneDNN
(``cpu``), and the compiled extension's CPU encoder and decoder ops and CUDA decoder ops with their fallbacks
(``extension``).

Imports from the project: prepared, core, _C.
"""
