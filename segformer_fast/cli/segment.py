"""``segformer-fast segment``: label maps (and overlays) for image files and folders, in process, on Ray (--ray) or
under torchrun; every way writes the same files and manifest, resumes from it and prints the same words."""

from __future__ import annotations

import sys

from segformer_fast.cli.common import (
    DEVICE_HELP,
    DTYPE_HELP,
    MODEL_HELP,
    add_scaleout_arguments,
    batch_size,
    check_resize,
    check_scaleout_arguments,
    note_half_precision_on_cpu,
    ray_pool,
)
from segformer_fast.core.fileio import check_can_create, check_output_folder
from segformer_fast.core.runtime import DTYPES, parse_dtype, resolve_device
from segformer_fast.inference.windows import resolve_window
from segformer_fast.jobs.local import segment_in_process
from segformer_fast.jobs.outputs import OUTPUT_KINDS, parse_outputs
from segformer_fast.jobs.predictors import ENGINES
from segformer_fast.jobs.ray_executor import segment_with_ray
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.jobs.torchrun_executor import segment_torchrun
from segformer_fast.jobs.workers import torchrun_world

NAME = "segment"
DEFAULT_ALPHA = 0.5


def register(commands) -> None:
    parser = commands.add_parser(
        NAME, help="segment images; writes <name>_labels.png and <name>_overlay.png",
        description="Segment image files and folders (searched recursively). Each image gets <name>_labels.png "
                    "(class ids: a palette PNG in the dataset's colors for up to 256 classes, a 16-bit grayscale "
                    "PNG above that) and <name>_overlay.png under --out, mirroring the input folders, and a line in "
                    "--out/manifest.jsonl. Run the same command again to resume: finished images are skipped. Two "
                    "inputs that would write the same outputs are refused before the run starts.")
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--out", required=True, help="output folder (mirrors the input folders' layout; may be "
                        "inside an input folder, never an input folder itself)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--engine", default="fast", choices=ENGINES,
                        help="fast: segformer_fast.optimize (default); reference: the eager reference model; "
                             "transformers: transformers' model with the same weights")
    resize = parser.add_mutually_exclusive_group()
    resize.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="resize every image to H x W (transformers' processor); default 512 512 with --mode "
                             "whole, the images' own size with --mode slide/auto")
    resize.add_argument("--short-side", type=int, metavar="N",
                        help="keep-ratio resize: short side N, sides rounded up to multiples of 32 (mmseg)")
    resize.add_argument("--no-resize", action="store_true", help="run every image at its own resolution")
    parser.add_argument("--max-long-side", type=int, metavar="N", help="with --short-side: cap the long side")
    parser.add_argument("--mode", default="whole", choices=["whole", "slide", "auto"],
                        help="whole: one forward per image (default); slide: mmseg's sliding windows (--crop, "
                             "--stride), with a progress bar of the windows; auto: whole, and sliding windows (with "
                             "a warning) where whole runs out of memory, printing the choice per image")
    parser.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                        help="sliding-window size, --mode slide or auto (default 1024 1024)")
    parser.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"),
                        help="sliding-window stride, --mode slide or auto (default 2/3 of the crop)")
    parser.add_argument("--outputs", default="labels,overlay", metavar="LIST",
                        help=f"what to write per image, comma-separated: {', '.join(OUTPUT_KINDS)} (overlay-jpg: "
                             "<name>_overlay.jpg, several times cheaper to encode than the PNG; default "
                             "labels,overlay)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="also skip images whose outputs all exist without a manifest record (an older run, or "
                             "one killed between writing and recording), and remove the temporary files an "
                             "interrupted run left in --out")
    parser.add_argument("--retry-failed", action="store_true",
                        help="also redo the images the manifest records as failed (else a re-run skips them)")
    parser.add_argument("--alpha", type=float,
                        help=f"label color weight in the overlay, 0..1 (default {DEFAULT_ALPHA}; with an overlay in "
                             "--outputs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_scaleout_arguments(parser, torchrun_batches=True)
    parser.set_defaults(func=run)


def segment_resize(args) -> dict:
    """``segment``'s resize arguments: --short-side (keep ratio), --size H W, --no-resize; by default 512 x 512 in
    whole mode and the images' own resolution in slide and auto modes (huge images are what those modes are for).
    ValueError for values ``preprocess`` would refuse."""
    if args.short_side is not None or args.max_long_side is not None:
        resize = {"short_side": args.short_side, "max_long_side": args.max_long_side, "size": None}
    elif args.no_resize or (args.size is None and args.mode != "whole"):
        resize = {"size": None}
    else:
        resize = {"size": tuple(args.size) if args.size else (512, 512)}
    return check_resize(resize)


def settings_from_args(args) -> SegmentSettings:
    """The job's settings from the options, every one checked (ValueError) before any work."""
    resize = segment_resize(args)
    outputs = parse_outputs(args.outputs)
    alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
    if args.alpha is not None and not any(kind.startswith("overlay") for kind in outputs):
        raise ValueError(f"--alpha weighs the overlay's colors, and --outputs {args.outputs} writes no overlay")
    if (args.crop or args.stride) and args.mode == "whole":
        raise ValueError("--crop and --stride apply to --mode slide and auto only (whole mode runs one forward per "
                         "image)")
    resolve_window(args.crop, args.stride)
    return SegmentSettings(model=str(args.model), engine=args.engine, dtype=args.dtype, size=resize.get("size"),
                           short_side=resize.get("short_side"), max_long_side=resize.get("max_long_side"),
                           mode=args.mode, crop=tuple(args.crop) if args.crop else None,
                           stride=tuple(args.stride) if args.stride else None, alpha=alpha,
                           outputs=outputs).resolved()  # the same records for every executor


def print_plan(plan) -> None:
    """What planning found, before the work: special files and torn manifest lines on stderr, the rest on stdout."""
    for line in plan.warnings():
        print(line, file=sys.stderr)
    for line in plan.notes():
        print(line)


def run(args) -> int:
    """Check everything, plan, run on the chosen executor, print the summary; exit 1 when any image failed."""
    settings = settings_from_args(args)
    check_scaleout_arguments(args, torchrun_batches=True)
    device = resolve_device(args.device)
    check_output_folder(args.out, args.inputs)
    check_can_create(args.out, "--out folder")
    options = {"retry_failed": args.retry_failed, "skip_existing": args.skip_existing, "progress": not args.quiet}
    if torchrun_world() is not None:
        summary = segment_torchrun(args.inputs, args.out, settings, device=args.device, batch_size=batch_size(args),
                                   on_plan=print_plan, **options)
    elif args.ray is not None:
        summary = segment_with_ray(args.inputs, args.out, settings, on_plan=print_plan, **ray_pool(args), **options)
    else:
        def on_plan(plan) -> None:
            print_plan(plan)
            if plan.todo:
                note_half_precision_on_cpu(device, parse_dtype(args.dtype))

        summary = segment_in_process(args.inputs, args.out, settings, device=device, on_plan=on_plan, **options)
    if summary.report:
        print(summary.format())
        lines = summary.failure_lines()
        if lines:
            print("\n".join(lines), file=sys.stderr)
    return summary.exit_code

