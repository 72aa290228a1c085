"""The ``segformer-fast`` verbs (``VERBS``, one module each with ``register(commands)`` and ``run(args)``), the
parser, and :func:`run`: parse, run the verb, turn errors into one line and an exit code (2 usage, 130 Ctrl-C, 143
SIGTERM). ``segformer_fast.cli.main`` calls it once the arguments ask for more than the version."""

from __future__ import annotations

import argparse
import difflib
import re
import sys

from segformer_fast import __version__
from segformer_fast.cli import evaluate, export, info, init, segment, serve
from segformer_fast.cli.common import Terminated
from segformer_fast.jobs.progress import Interrupted
from segformer_fast.jobs.workers import torchrun_world

DESCRIPTION = (
    "SegFormer inference: segment images, evaluate mIoU on ADE20K / Cityscapes, describe or create checkpoints, "
    "export to ONNX / torch.export. Run 'segformer-fast COMMAND --help' for a command's options."
)
#: The verbs, in the order ``--help`` lists them.
VERBS = (segment, info, evaluate, init, export, serve)
_HUB_MISS = re.compile(r"could not resolve hub id '([^']+)'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segformer-fast", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.register(commands)
    parser.verbs = commands.choices  # name -> the verb's parser
    return parser


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parsed arguments; an unknown option ends with its verb's usage and the nearest option it has."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        verb = parser.verbs.get(args.command, parser)
        known = [flag for action in verb._actions for flag in action.option_strings]
        hints = []
        for extra in extras:
            close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1) if extra.startswith("-") else []
            hints.append(f"{extra} (did you mean {close[0]}?)" if close else extra)
        verb.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def _message(error: BaseException) -> str:
    """The one line a usage error prints (an unknown hub id offline gets the way out)."""
    text = str(error).strip() or type(error).__name__
    if not isinstance(error, ValueError):  # ours are one line (a list of what was found may follow); others' first
        text = text.splitlines()[0]
    missing = _HUB_MISS.search(text)
    if missing:
        return (f"checkpoint {missing.group(1)!r} not found: not a local file or folder, and not in the Hugging Face "
                "cache (offline, or no such model on the hub). Give a local checkpoint path, or make one offline "
                "with 'segformer-fast init b0 FOLDER'")
    return text


def run(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as stop:  # Ctrl-C: one line (from torchrun's rank 0 only), no traceback
        world = torchrun_world()
        if world is None or world[0] == 0:
            print(f"segformer-fast: {stop if isinstance(stop, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM while a command wrote files (``common.stop_on_sigterm``): cleaned up, one line
        print("segformer-fast: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"segformer-fast: {_message(error)}", file=sys.stderr)
        return 2
