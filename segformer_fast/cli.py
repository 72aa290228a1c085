"""The ``segformer-fast`` command: ``segment`` images, ``info`` about a checkpoint, ``bench`` the models."""

import argparse
import sys
from pathlib import Path

import numpy as np

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"segformer-fast: --device {name} requested but CUDA is not available")
    return device


def _output_stem(image_path: Path, roots: list) -> Path:
    """Output path (without suffix) for an input: its path relative to the folder it was found in, else its name."""
    resolved = image_path.resolve()
    for root in roots:
        if root.is_dir():
            try:
                return resolved.relative_to(root.resolve()).with_suffix("")
            except ValueError:
                continue
    return Path(image_path.stem)


def save_label_png(labels: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """Write a label map atomically: a palette PNG (pixel values are class ids, shown in the palette's colors) for
    up to 256 classes, a 16-bit grayscale PNG of class ids above that."""
    from PIL import Image

    from .fileio import atomic_path

    if len(palette) <= 256:
        image = Image.fromarray(labels.astype(np.uint8), "P")
        image.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def cmd_segment(args) -> int:
    import torch
    from tqdm import tqdm

    from .checkpoints import load
    from .fileio import atomic_path, find_images, load_image
    from .ops import upsample_argmax
    from .palettes import overlay, palette_for
    from .processing import postprocess, preprocess

    device = _resolve_device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        images = find_images(args.inputs)
    except FileNotFoundError as err:
        print(f"segformer-fast: {err}", file=sys.stderr)
        return 2
    if not images:
        print("segformer-fast: no images found in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    model = load(args.model).to(device=device)
    palette = palette_for(model.config.num_labels)
    if args.engine == "fast":
        from .engine import optimize

        engine = optimize(model, dtype=dtype)
        forward = engine.logits
    elif args.engine == "transformers":
        hf_model = model.to(dtype=dtype).to_transformers()

        def forward(pixel_values):
            return hf_model(pixel_values=pixel_values).logits
    else:
        forward = model.to(dtype=dtype)
    out_dir = Path(args.out)
    roots = [Path(p) for p in args.inputs]
    resize = {"short_side": args.short_side, "max_long_side": args.max_long_side} if args.short_side else {
        "size": tuple(args.size)
    }
    failures = []
    with torch.inference_mode():
        for image_path in tqdm(images, desc="segment", unit="img", disable=args.quiet):
            try:
                image = load_image(image_path)
            except (ValueError, OSError) as err:
                failures.append(f"{image_path}: {err}")
                tqdm.write(f"skipped {image_path}: {err}", file=sys.stderr)
                continue
            pixel_values = preprocess(image, device=device, dtype=dtype, **resize)
            logits = forward(pixel_values)
            if args.engine == "fast":
                labels = upsample_argmax(logits, image.height, image.width)[0].cpu().numpy()
            else:
                labels = postprocess(logits, (image.height, image.width))[0].cpu().numpy()
            stem = out_dir / _output_stem(image_path, roots)
            stem.parent.mkdir(parents=True, exist_ok=True)
            save_label_png(labels, palette, stem.with_name(stem.name + "_labels.png"))
            with atomic_path(stem.with_name(stem.name + "_overlay.png")) as temporary:
                overlay(image, labels, palette, alpha=args.alpha).save(temporary, format="PNG")
    done = len(images) - len(failures)
    print(f"segmented {done} of {len(images)} images into {out_dir}")
    if failures:
        print(f"{len(failures)} images failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def cmd_info(args) -> int:
    from .checkpoints import load

    model = load(args.source)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    labels = config.id2label
    shown = ", ".join(f"{k}: {v}" for k, v in list(sorted(labels.items()))[:10]) if labels else "(no names)"
    more = f" ... ({len(labels)} in all)" if len(labels) > 10 else ""
    print(f"source:          {args.source}")
    print(f"variant:         MiT-{config.variant.upper()} (embed dims {list(config.embed_dims)}, depths {list(config.depths)}, decoder {config.decoder_dim})")
    print(f"parameters:      {parameters / 1e6:.2f} M")
    print(f"num_labels:      {config.num_labels}")
    print(f"labels:          {shown}{more}")
    print(f"key family:      {getattr(model, 'source_family', 'unknown')}")
    print(f"eps convention:  {config.eps_convention} {config.eps}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segformer-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment images; writes <name>_labels.png and <name>_overlay.png")
    segment.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    segment.add_argument("--model", required=True, help="checkpoint: folder, weights file or hub id")
    segment.add_argument("--out", required=True, help="output folder (mirrors the input folders' layout)")
    segment.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    segment.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    segment.add_argument("--engine", default="fast", choices=["fast", "reference", "transformers"],
                         help="fast: segformer_fast.optimize (default); reference: the eager reference model; "
                              "transformers: transformers' model with the same weights")
    resize = segment.add_mutually_exclusive_group()
    resize.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=[512, 512],
                        help="resize every image to H x W (transformers' processor; default 512 512)")
    resize.add_argument("--short-side", type=int, metavar="N",
                        help="keep-ratio resize: short side N, sides rounded up to multiples of 32 (mmseg)")
    segment.add_argument("--max-long-side", type=int, metavar="N", help="with --short-side: cap the long side")
    segment.add_argument("--alpha", type=float, default=0.5, help="label color weight in the overlay (0..1)")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    segment.set_defaults(func=cmd_segment)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("source", help="checkpoint: folder, weights file or hub id")
    info.set_defaults(func=cmd_info)

    from .bench import add_arguments, main_from_args

    bench = commands.add_parser("bench", help="benchmark the models (images/s, latency, memory)")
    add_arguments(bench)
    bench.set_defaults(func=main_from_args)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_long_side", None) and not getattr(args, "short_side", None):
        print("segformer-fast: --max-long-side needs --short-side", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"segformer-fast: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
