"""The ``segformer-fast`` command: ``segment`` images, ``info`` about a checkpoint, ``eval`` mIoU on a dataset,
``export`` a model to ONNX / torch.export. Parsing, printing and exit codes; the work is done by the package's
modules. (The benchmarks are scripts in the repository's benchmarks/ folder: ``make bench``.)"""

import argparse
import math
import sys
import time
from pathlib import Path

from .datasets import FORMATS, default_resize, default_window, open_dataset
from .distributed import evaluate_torchrun, segment_torchrun
from .evaluation import evaluate, format_summary, write_report
from .export import export_onnx, export_program
from .fileio import find_images
from .inference import resolve_window
from .model import Segformer
from .outputs import outputs_exist, segment_files
from .palettes import palette_for
from .predictors import ENGINES, make_predictor
from .ray_segment import evaluate_with_ray, segment_with_ray
from .runtime import DTYPES, parse_dtype, resolve_device
from .scaleout import SegmentSettings, check_model_classes, torchrun_world

#: ``eval``'s inference modes: a score comes from one known mode, so the fallback mode "auto" is not offered.
EVAL_MODES = ("whole", "slide")


def cmd_segment(args) -> int:
    """``segformer-fast segment``: label and overlay PNGs for every input image; exit 1 when any image failed."""
    if wants_scaleout(args):
        return scaleout_segment(args)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    crop, stride = resolve_window(args.crop, args.stride)
    images = find_images(args.inputs)
    if not images:
        print("segformer-fast: no images found in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    roots = [Path(p) for p in args.inputs]
    todo = [path for path in images if not (args.skip_existing and outputs_exist(out_dir, path, roots))]
    skipped = len(images) - len(todo)
    if skipped:
        print(f"skipped {skipped} of {len(images)} images whose outputs already exist in {out_dir}")
    if not todo:
        print(f"segmented {len(images)} of {len(images)} images into {out_dir} ({skipped} already done, skipped)")
        return 0

    model = Segformer.from_pretrained(args.model).to(device=device)
    # Resizing: --short-side (keep ratio), --size H W, --no-resize; by default 512 x 512 in whole mode and the
    # images' own resolution in slide and auto modes (huge images are what those modes are for).
    if args.short_side:
        resize = {"short_side": args.short_side, "max_long_side": args.max_long_side, "size": None}
    elif args.no_resize or (args.size is None and args.mode != "whole"):
        resize = {"size": None}
    else:
        resize = {"size": tuple(args.size) if args.size else (512, 512)}
    predict = make_predictor(model, args.engine, args.mode, resize=resize, device=device, dtype=dtype, crop=crop,
                             stride=stride)
    failures = segment_files(todo, predict, palette_for(model.config.num_labels), out_dir, roots, alpha=args.alpha,
                             progress=not args.quiet)
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
    model = Segformer.from_pretrained(args.source)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    labels = config.id2label
    shown = ", ".join(f"{k}: {v}" for k, v in list(sorted(labels.items()))[:10]) if labels else "(no names)"
    more = f" ... ({len(labels)} in all)" if len(labels) > 10 else ""
    print(f"source:          {args.source}")
    print(f"variant:         MiT-{config.variant.upper()} (embed dims {list(config.embed_dims)}, "
          f"depths {list(config.depths)}, decoder {config.decoder_dim})")
    print(f"parameters:      {parameters / 1e6:.2f} M")
    print(f"num_labels:      {config.num_labels}")
    print(f"labels:          {shown}{more}")
    print(f"key family:      {getattr(model, 'source_family', 'unknown')}")
    print(f"eps convention:  {config.eps_convention} {config.eps}")
    return 0


def add_eval_arguments(parser) -> None:
    """The ``segformer-fast eval`` options (``cmd_eval`` takes the parsed namespace)."""
    parser.add_argument("--model", required=True, metavar="SRC", help="checkpoint: folder, weights file or hub id")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="ade20k: DIR/images/validation + DIR/annotations/validation (or DIR/images + "
                             "DIR/annotations); cityscapes: DIR/leftImg8bit/val + DIR/gtFine/val")
    parser.add_argument("--engine", default="fast", choices=ENGINES, help="model to evaluate (default fast)")
    parser.add_argument("--mode", default="whole", choices=EVAL_MODES,
                        help="whole: one forward per image (default); slide: sliding-window inference")
    resize = parser.add_mutually_exclusive_group()
    resize.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="resize every image to H x W (transformers' processor)")
    resize.add_argument("--short-side", type=int, metavar="N",
                        help="keep-ratio resize to short side N (long side capped by --max-long-side, default 2048), "
                             "sides rounded up to multiples of 32. Default without --size / --short-side: mmseg's "
                             "test resize, ade20k short side 512, cityscapes short side 1024 (native 1024x2048 "
                             "images are not resized), long side at most 2048")
    parser.add_argument("--max-long-side", type=int, metavar="N", help="with --short-side: cap the long side "
                        "(default 2048)")
    parser.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                        help="--mode slide window size (default: cityscapes 1024 1024, ade20k 512 512)")
    parser.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"),
                        help="--mode slide window step (default: cityscapes 768 768, ade20k 341 341)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--compare", choices=["reference", "transformers"],
                        help="also evaluate this model (same device, dtype, resize and mode) and report both mIoUs "
                             "and the pixel agreement")
    parser.add_argument("--out", metavar="JSON", help="write the full report (per-class IoU/Acc) to this file")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (quick checks)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resize_from_args(args) -> dict:
    """The ``preprocess`` resize arguments the eval options select (see ``add_eval_arguments``)."""
    if getattr(args, "max_long_side", None) is not None and getattr(args, "short_side", None) is None:
        raise ValueError("--max-long-side needs --short-side")
    if getattr(args, "size", None):
        return {"size": tuple(args.size)}
    if getattr(args, "short_side", None) is not None:
        return {"short_side": args.short_side,
                "max_long_side": args.max_long_side if args.max_long_side is not None else 2048}
    return default_resize(args.format)


def window_from_args(args) -> dict:
    """``{"crop": (h, w), "stride": (h, w)}`` for ``--mode slide`` (the format's defaults where not given), else
    ``{}``; ValueError for --crop / --stride without --mode slide."""
    if args.mode == "slide":
        window = default_window(args.format)
        return {"crop": tuple(args.crop) if args.crop else window["crop"],
                "stride": tuple(args.stride) if args.stride else window["stride"]}
    if args.crop or args.stride:
        raise ValueError("--crop and --stride apply to --mode slide only")
    return {}


def cmd_eval(args) -> int:
    """``segformer-fast eval``: evaluate a checkpoint on a dataset, print a summary, optionally write the report."""
    if wants_scaleout(args):
        return scaleout_eval(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    resize = resize_from_args(args)
    mode_options = window_from_args(args)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    dataset = open_dataset(args.format, args.data, args.limit)
    model = Segformer.from_pretrained(args.model).to(device=device).eval()
    num_classes = model.config.num_labels
    if num_classes != dataset.num_classes:
        raise ValueError(
            f"{args.model} predicts {num_classes} classes but {args.format} has {dataset.num_classes}; "
            "use a checkpoint trained on this dataset"
        )
    # The engine is built first: the reference predictor casts the model to dtype in place.
    predict = make_predictor(model, args.engine, args.mode, resize=resize, device=device, dtype=dtype,
                             **mode_options)
    reference = None
    if args.compare:
        reference = make_predictor(model, args.compare, args.mode, resize=resize, device=device, dtype=dtype,
                                   **mode_options)
    result = evaluate(predict, dataset, num_classes, progress=not args.quiet, reference=reference)
    if "comparison" in result:
        result["comparison"]["against"] = args.compare
    result["settings"] = {
        "model": str(args.model),
        "engine": args.engine,
        "mode": args.mode,
        **{k: list(v) for k, v in mode_options.items()},
        "resize": {k: list(v) if isinstance(v, tuple) else v for k, v in resize.items()},
        "device": str(device),
        "dtype": args.dtype,
        "limit": args.limit,
        "compare": args.compare,
    }
    window = f" (crop {mode_options['crop']}, stride {mode_options['stride']})" if mode_options else ""
    print(f"{args.format} {args.data}: {args.engine} engine, {args.mode} mode{window}, {args.dtype} on {device}")
    print(format_summary(result))
    if args.out:
        write_report(result, args.out)
        print(f"report written to {args.out}")
    return 0



# ------------------------------------------------------------------- scale-out: Ray (--ray) and torchrun
def settings_from_segment_args(args) -> SegmentSettings:
    """The settings ``segformer-fast segment`` options select (its resize defaults: 512 x 512 in whole mode, the
    images' own size in slide and auto modes)."""
    if args.no_resize or (args.size is None and args.mode != "whole" and not args.short_side):
        size = None
    else:
        size = tuple(args.size) if args.size else (512, 512)
    return SegmentSettings(model=str(args.model), engine=args.engine, dtype=args.dtype, size=size,
                           short_side=args.short_side, max_long_side=args.max_long_side, mode=args.mode,
                           crop=tuple(args.crop) if args.crop else None,
                           stride=tuple(args.stride) if args.stride else None, overlay=True, alpha=args.alpha)




def eval_settings_from_args(args) -> tuple:
    """(SegmentSettings, dataset, settings for the report) from ``segformer-fast eval`` options, as ``run_eval``
    reads them (the dataset opened and ``--limit`` applied)."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    if args.compare:
        raise ValueError("--compare runs in one process only; drop it with --ray or torchrun")
    resize = resize_from_args(args)
    window = window_from_args(args)
    dataset = open_dataset(args.format, args.data, args.limit)
    settings = SegmentSettings(model=str(args.model), engine=args.engine, dtype=args.dtype,
                               size=resize.get("size"), short_side=resize.get("short_side"),
                               max_long_side=resize.get("max_long_side"), mode=args.mode, **window)
    report_settings = {
        "model": str(args.model), "engine": args.engine, "mode": args.mode,
        **{key: list(value) for key, value in window.items()},
        "resize": {key: list(value) if isinstance(value, tuple) else value for key, value in resize.items()},
        "dtype": args.dtype, "limit": args.limit,
    }
    return settings, dataset, report_settings


def add_scaleout_arguments(parser) -> None:
    """The scale-out options of ``segment`` and ``eval``."""
    group = parser.add_argument_group(
        "scale-out", "Ray Data (--ray), or torchrun: torchrun --nproc-per-node N -m segformer_fast ...")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: a local cluster, or the running one at ADDRESS (auto, host:6379, "
                            "ray://host:10001)")
    group.add_argument("--workers", type=int, default=1, metavar="N", help="Ray actors, one engine each (default 1)")
    group.add_argument("--gpus-per-worker", type=float, metavar="F",
                       help="GPUs per Ray actor (fractions share a GPU; default 1 where the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-worker", type=float, default=1, metavar="C",
                       help="CPUs per Ray actor, also its torch threads (default 1)")
    group.add_argument("--batch-size", type=int, default=4, metavar="B",
                       help="images per batch sent to a worker (Ray) or run at once by a rank (torchrun; default 4)")
    group.add_argument("--retry-failed", action="store_true",
                       help="segment: also redo the images the manifest records as failed (else a re-run skips them)")


def wants_scaleout(args) -> bool:
    """True when the command runs on Ray (--ray) or under torchrun."""
    return getattr(args, "ray", None) is not None or torchrun_world() is not None


def _needs_ray(command):
    """Turns a missing ray into the command's usage error (exit code 2) naming the extra to install."""

    def run(args) -> int:
        try:
            return command(args)
        except ImportError as error:
            print(f"segformer-fast: {error}", file=sys.stderr)
            return 2

    return run


@_needs_ray
def scaleout_segment(args) -> int:
    """``segformer-fast segment`` on Ray or under torchrun: run, print the summary, return the exit code."""
    settings = settings_from_segment_args(args)
    if torchrun_world() is not None:
        summary = segment_torchrun(args.inputs, args.out, settings, device=args.device, batch_size=args.batch_size,
                                   retry_failed=args.retry_failed, progress=not args.quiet)
    else:
        summary = segment_with_ray(args.inputs, args.out, settings, workers=args.workers,
                                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                                   batch_size=args.batch_size, address=args.ray, retry_failed=args.retry_failed,
                                   progress=not args.quiet)
    if summary.report:
        print(summary.format(), file=sys.stderr if summary.exit_code else sys.stdout)
    return summary.exit_code


@_needs_ray
def scaleout_eval(args) -> int:
    """``segformer-fast eval`` on Ray or under torchrun: the same report as one process (rank 0 prints it)."""
    settings, dataset, report_settings = eval_settings_from_args(args)
    check_model_classes(settings.model, dataset)
    start = time.perf_counter()
    if torchrun_world() is not None:
        result, where = evaluate_torchrun(dataset, settings, device=args.device, progress=not args.quiet)
    else:
        result = evaluate_with_ray(dataset, settings, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                                   cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                   address=args.ray, progress=not args.quiet)
        where = f"Ray, {args.workers} worker{'s' if args.workers != 1 else ''}"
    if result is None:  # a torchrun rank other than 0
        return 0
    seconds = time.perf_counter() - start
    result["settings"] = {**report_settings, "scale_out": where}
    images = result["counts"]["images"]
    print(f"{args.format} {args.data}: {args.engine} engine, {args.mode} mode, {args.dtype}, {where}")
    print(format_summary(result))
    print(f"{images} images in {seconds:.1f} s: {images / seconds if seconds > 0 else math.nan:.2f} images/s")
    if args.out:
        write_report(result, args.out)
        print(f"report written to {args.out}")
    return 0


# ------------------------------------------------------------------------------- export (parser and handler)
def cmd_export(args) -> int:

    if not args.onnx and not args.pt2:
        print("segformer-fast: export needs --onnx PATH and/or --pt2 PATH", file=sys.stderr)
        return 2
    shape = {"dynamic": args.static is None}
    if args.static:
        shape.update(size=tuple(args.static), batch=args.batch)
    model = Segformer.from_pretrained(args.model)
    reports = []
    if args.onnx:
        reports.append(export_onnx(model, args.onnx, dtype=args.dtype, opset=args.opset,
                                   output="labels" if args.labels else "logits", **shape))
    if args.pt2:
        reports.append(export_program(model, args.pt2, dtype=args.dtype, **shape))
    for report in reports:
        sizes = "any batch and size" if report["dynamic"] else "static"
        print(f"wrote {report['path']} ({report['dtype']}, {sizes})")
        if not report["verified"]:
            print("  not verified: onnxruntime is not installed")
        for check in report["checks"]:
            measured = (f"max abs error {check['max_abs_error']:.3e}" if "max_abs_error" in check else
                        f"label agreement {check['agreement']:.4%}, {check['confident_mismatches']} clear mismatches")
            print(f"  verified on {check['shape']}: {measured}, tolerance {check['tolerance']:.3e}")
    return 0


def add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="export the folded, verified graph to ONNX and/or torch.export")
    export.add_argument("--model", required=True, help="checkpoint: folder, weights file or hub id")
    export.add_argument("--onnx", metavar="PATH", help="write an ONNX file (.onnx)")
    export.add_argument("--pt2", metavar="PATH", help="write a torch.export program (.pt2)")
    export.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="graph dtype (ONNX: fp32, fp16)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset, 17..20 (default 17)")
    export.add_argument("--labels", action="store_true",
                        help="ONNX output: label maps at the input size (upsample + argmax in the graph)")
    export.add_argument("--static", nargs=2, type=int, metavar=("H", "W"),
                        help="export for this input size only (default: dynamic batch, height and width)")
    export.add_argument("--batch", type=int, default=1, help="with --static: the batch size (default 1)")
    export.set_defaults(func=cmd_export)


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

    eval_parser = commands.add_parser(
        "eval", help="mIoU / aAcc / mAcc of a checkpoint on an ADE20K or Cityscapes folder (mmseg metrics)")
    add_eval_arguments(eval_parser)
    add_scaleout_arguments(eval_parser)
    eval_parser.set_defaults(func=cmd_eval)
    add_export_parser(commands)
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
