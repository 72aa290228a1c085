"""``segformer-fast info``: describe a checkpoint."""

from __future__ import annotations

from segformer_fast.cli.common import MODEL_HELP
from segformer_fast.model.segformer import Segformer

NAME = "info"


def register(commands) -> None:
    parser = commands.add_parser(NAME, help="describe a checkpoint")
    parser.add_argument("source", help=MODEL_HELP)
    parser.set_defaults(func=run)


def run(args) -> int:
    model = Segformer.from_pretrained(args.source)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    labels = config.id2label
    shown = ", ".join(f"{k}: {v}" for k, v in list(sorted(labels.items()))[:10]) if labels else "(no names)"
    more = f" ... ({len(labels)} in all)" if len(labels) > 10 else ""
    print(f"source:          {args.source}")
    print(f"variant:         MiT-{config.variant.upper()} (embed dims {list(config.embed_dims)}, depths "
          f"{list(config.depths)}, decoder {config.decoder_dim})")
    print(f"parameters:      {parameters / 1e6:.2f} M")
    print(f"num_labels:      {config.num_labels}")
    print(f"labels:          {shown}{more}")
    print(f"key family:      {getattr(model, 'source_family', 'unknown')}")
    print(f"eps convention:  {config.eps_convention} {config.eps}")
    return 0
