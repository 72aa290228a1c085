"""The ``segformer-fast`` command: ``segment`` images, ``info`` about a checkpoint, ``eval`` mIoU on a dataset,
``init`` a random-weight checkpoint, ``export`` a model to ONNX / torch.export, ``serve`` it over HTTP (the service
itself is ``segformer_fast.serve``); ``segment`` and ``eval`` also run on Ray (``--ray``) or under torchrun. One
module per verb (``commands.VERBS``), each with ``register(commands)`` and ``run(args)``; the work is done by
``segformer_fast.jobs`` and ``segformer_fast.serve`` and the rooms below them. Every argument and output path is
checked before a model is loaded; bad input ends with a one-line error and exit code 2, Ctrl-C with one line and exit
code 130. (The benchmarks are scripts in the repository's benchmarks/ folder: ``make bench``.)

:func:`main` is the entry point: ``--version`` is answered before the verbs (and torch with them) are imported.

Imports from the project: serve, jobs, render, export, inference, model, core, segformer_fast.
"""

from __future__ import annotations

import sys

from segformer_fast import __version__


def main(argv=None) -> int:
    """Run ``segformer-fast`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments == ["--version"]:
        print(f"segformer-fast {__version__}")
        return 0
    # The one import inside a function outside an optional dependency: the verbs import torch, which takes seconds
    # that `--version` should not (docs/DESIGN.md section 2).
    from segformer_fast.cli.commands import run

    return run(arguments)
