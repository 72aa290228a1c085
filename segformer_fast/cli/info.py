"""``segformer-fast info``: describe a checkpoint."""

from __future__ import annotations

from segformer_fast.cli.common import MODEL_HELP
from segformer_fast.model.segformer import Segformer
from segformer_fast.render.palettes import DATASET_CLASS_NAMES, class_names

NAME = "info"
#: Class names printed before "... (N in all)".
SHOWN_CLASSES = 10


def register(commands) -> None:
    parser = commands.add_parser(
        NAME, help="describe a checkpoint",
        description="Load a checkpoint (folder, weights file or hub id) and print its variant, parameter count, "
                    "classes and their names (the checkpoint's own unless --class-names names a dataset's), key "
                    "family and LayerNorm eps convention.")
    parser.add_argument("source", help=MODEL_HELP)
    parser.add_argument("--class-names", choices=sorted(DATASET_CLASS_NAMES), metavar="DATASET",
                        help="show the classes with this dataset's names (ade20k, cityscapes) instead of the "
                             "checkpoint's own")
    parser.set_defaults(func=run)


def run(args) -> int:
    model = Segformer.from_pretrained(args.source)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    names = class_names(config.id2label, config.num_labels, args.class_names)
    shown = ", ".join(f"{index}: {name}" for index, name in enumerate(names[:SHOWN_CLASSES]))
    more = f" ... ({len(names)} in all)" if len(names) > SHOWN_CLASSES else ""
    print(f"source:          {args.source}")
    print(f"variant:         MiT-{config.variant.upper()} (embed dims {list(config.embed_dims)}, depths "
          f"{list(config.depths)}, decoder {config.decoder_dim})")
    print(f"parameters:      {parameters / 1e6:.2f} M")
    print(f"num_labels:      {config.num_labels}")
    print(f"labels:          {shown}{more}" + (f" ({args.class_names}'s names)" if args.class_names else ""))
    print(f"key family:      {getattr(model, 'source_family', 'unknown')}")
    print(f"eps convention:  {config.eps_convention} {config.eps}")
    return 0
