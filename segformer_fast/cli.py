"""The ``segformer-fast`` command: ``segment`` images, ``info`` about a checkpoint, ``eval`` mIoU on a dataset,
``bench`` the models."""

import argparse
import sys
from pathlib import Path

from .inference import ENGINES
from .outputs import label_paths, save_label_png
from .scaleout_commands import add_scaleout_arguments, eval_command, segment_command, wants_scaleout

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(name: str):
    """``auto`` (cuda when available, else cpu) or a torch device name; ValueError for CUDA without a GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return device


def _describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def cmd_segment(args) -> int:
    import warnings

    import torch
    from tqdm import tqdm

    from .checkpoints import load
    from .fileio import atomic_path, find_images, load_image
    from .inference import build_forward, resolve_window, segment_images
    from .palettes import overlay, palette_for

    if wants_scaleout(args):
        return segment_command(args)
    device = resolve_device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        crop, stride = resolve_window(args.crop, args.stride)
    except ValueError as err:
        print(f"segformer-fast: {err}", file=sys.stderr)
        return 2
    try:
        images = find_images(args.inputs)
    except FileNotFoundError as err:
        print(f"segformer-fast: {err}", file=sys.stderr)
        return 2
    if not images:
        print("segformer-fast: no images found in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    roots = [Path(p) for p in args.inputs]
    todo, skipped = [], 0
    for image_path in images:
        if args.skip_existing and all(p.is_file() for p in label_paths(out_dir, image_path, roots)):
            skipped += 1
        else:
            todo.append(image_path)
    if skipped:
        print(f"skipped {skipped} of {len(images)} images whose outputs already exist in {out_dir}")
    if not todo:
        print(f"segmented {len(images)} of {len(images)} images into {out_dir} ({skipped} already done, skipped)")
        return 0

    model = load(args.model).to(device=device)
    palette = palette_for(model.config.num_labels)
    # Resizing: --short-side (keep ratio), --size H W, --no-resize; by default 512 x 512 in whole mode and the
    # images' own resolution in slide and auto modes (huge images are what those modes are for).
    if args.short_side:
        resize = {"short_side": args.short_side, "max_long_side": args.max_long_side, "size": None}
    elif args.no_resize or (args.size is None and args.mode != "whole"):
        resize = {"size": None}
    else:
        resize = {"size": tuple(args.size) if args.size else (512, 512)}
    forward, whole_labels = build_forward(model, args.engine, dtype)

    def segment(image):
        return segment_images(image, forward, num_labels=model.config.num_labels, device=device, dtype=dtype,
                              mode=args.mode, crop=crop, stride=stride, whole_labels=whole_labels, **resize)

    failures = []
    with torch.inference_mode():
        for image_path in tqdm(todo, desc="segment", unit="img", disable=args.quiet):
            try:
                image = load_image(image_path)
            except (ValueError, OSError) as err:
                failures.append(f"{image_path}: {err}")
                tqdm.write(f"cannot read {image_path}: {err}", file=sys.stderr)
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    labels = segment(image).cpu().numpy()
                for warning in caught:
                    tqdm.write(f"{image_path}: {warning.message}", file=sys.stderr)
                labels_path, overlay_path = label_paths(out_dir, image_path, roots)
                labels_path.parent.mkdir(parents=True, exist_ok=True)
                save_label_png(labels, palette, labels_path)
                with atomic_path(overlay_path) as temporary:
                    overlay(image, labels, palette, alpha=args.alpha).save(temporary, format="PNG")
            except Exception as err:  # one bad image (out of memory, unwritable output, ...) must not stop the run
                failures.append(f"{image_path}: {_describe_error(err)}")
                tqdm.write(f"failed {image_path}: {_describe_error(err)}", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
    done = len(images) - len(failures)
    note = f" ({skipped} already done, skipped)" if skipped else ""
    print(f"segmented {done} of {len(images)} images into {out_dir}{note}")
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
    segment.add_argument("--engine", default="fast", choices=ENGINES,
                         help="fast: segformer_fast.optimize (default); reference: the eager reference model; "
                              "transformers: transformers' model with the same weights")
    resize = segment.add_mutually_exclusive_group()
    resize.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="resize every image to H x W (transformers' processor); default 512 512 with --mode "
                             "whole, the images' own size with --mode slide/auto")
    resize.add_argument("--short-side", type=int, metavar="N",
                        help="keep-ratio resize: short side N, sides rounded up to multiples of 32 (mmseg)")
    resize.add_argument("--no-resize", action="store_true", help="run every image at its own resolution")
    segment.add_argument("--max-long-side", type=int, metavar="N", help="with --short-side: cap the long side")
    segment.add_argument("--mode", default="whole", choices=["whole", "slide", "auto"],
                         help="whole: one forward per image (default); slide: mmseg's sliding windows (--crop, "
                              "--stride); auto: whole, and sliding windows (with a warning) where whole runs out of "
                              "memory")
    segment.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                         help="sliding-window size (default 1024 1024)")
    segment.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"),
                         help="sliding-window stride (default 2/3 of the crop)")
    segment.add_argument("--skip-existing", action="store_true",
                         help="skip images whose _labels.png and _overlay.png both exist (resume a run)")
    segment.add_argument("--alpha", type=float, default=0.5, help="label color weight in the overlay (0..1)")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scaleout_arguments(segment)
    segment.set_defaults(func=cmd_segment)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("source", help="checkpoint: folder, weights file or hub id")
    info.set_defaults(func=cmd_info)

    from .evaluation import add_eval_arguments, run_eval

    evaluate = commands.add_parser(
        "eval", help="mIoU / aAcc / mAcc of a checkpoint on an ADE20K or Cityscapes folder (mmseg metrics)")
    add_eval_arguments(evaluate)
    add_scaleout_arguments(evaluate)
    evaluate.set_defaults(func=lambda args: eval_command(args) if wants_scaleout(args) else run_eval(args))

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
