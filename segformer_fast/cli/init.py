"""``segformer-fast init``: a checkpoint folder with deterministic random weights, made without network."""

from __future__ import annotations

from pathlib import Path

from segformer_fast.core.fileio import check_can_create, check_output_folder
from segformer_fast.model.config import VARIANTS
from segformer_fast.model.segformer import Segformer

NAME = "init"


def register(commands) -> None:
    parser = commands.add_parser(
        NAME, help="write a checkpoint with random weights (no network needed)",
        description="Write config.json and model.safetensors with deterministic random weights into FOLDER: a "
                    "checkpoint that every command and Segformer.from_pretrained accept, for trying the tools "
                    "offline (its predictions mean nothing). Refuses a folder that already holds a checkpoint.")
    parser.add_argument("variant", choices=list(VARIANTS), help="model size")
    parser.add_argument("folder", help="checkpoint folder to create (other files in it are left alone)")
    parser.add_argument("--num-labels", type=int, default=150, help="number of classes (default 150, as ADE20K)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=run)


def run(args) -> int:
    folder = Path(args.folder)
    if args.num_labels < 1:
        raise ValueError(f"--num-labels must be a positive integer, got {args.num_labels}")
    check_output_folder(folder, [])
    existing = [name for name in ("config.json", "model.safetensors") if (folder / name).exists()]
    if existing:
        raise ValueError(f"{folder} already holds {' and '.join(existing)}; init never replaces a checkpoint: "
                         "choose a new or empty folder")
    check_can_create(folder, "checkpoint folder")
    Segformer.from_config(args.variant, num_labels=args.num_labels, seed=args.seed).save_pretrained(folder)
    print(f"wrote a MiT-{args.variant.upper()} checkpoint with random weights ({args.num_labels} classes, seed "
          f"{args.seed}) to {folder}: it runs every command, but its predictions mean nothing")
    return 0
