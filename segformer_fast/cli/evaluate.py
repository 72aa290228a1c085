"""``segformer-fast eval``: mIoU / aAcc / mAcc of a checkpoint on an ADE20K or Cityscapes folder, in process, on Ray
(--ray) or under torchrun; the same report from every executor."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from segformer_fast.cli.common import (
    DEVICE_HELP,
    DTYPE_HELP,
    MODEL_HELP,
    add_scaleout_arguments,
    check_positive,
    check_resize,
    check_scaleout_arguments,
    note_half_precision_on_cpu,
    ray_pool,
    wants_scaleout,
)
from segformer_fast.core.fileio import check_can_create, check_output_file
from segformer_fast.core.runtime import DTYPES, parse_dtype, resolve_device
from segformer_fast.inference.windows import resolve_window
from segformer_fast.jobs.datasets import FORMATS, default_resize, default_window, open_dataset
from segformer_fast.jobs.evaluate import format_summary, write_report
from segformer_fast.jobs.local import evaluate_in_process
from segformer_fast.jobs.predictors import ENGINES
from segformer_fast.jobs.progress import plural
from segformer_fast.jobs.ray_executor import evaluate_with_ray
from segformer_fast.jobs.settings import SegmentSettings
from segformer_fast.jobs.torchrun_executor import evaluate_torchrun
from segformer_fast.jobs.workers import torchrun_world
from segformer_fast.model.checkpoints import checkpoint_class_names
from segformer_fast.render.palettes import DATASET_CLASS_NAMES, class_names

NAME = "eval"
#: ``eval``'s inference modes: a score comes from one known mode, so the fallback mode "auto" is not offered.
EVAL_MODES = ("whole", "slide")


def register(commands) -> None:
    parser = commands.add_parser(
        NAME, help="mIoU / aAcc / mAcc of a checkpoint on an ADE20K or Cityscapes folder (mmseg metrics)",
        description="Evaluate a checkpoint on an ADE20K or Cityscapes validation folder with mmseg's metrics (mIoU, "
                    "aAcc, mAcc, per-class IoU and Acc; ADE20K's reduce-zero-label, Cityscapes' trainIds), in whole "
                    "or sliding-window mode, at mmseg's test resize by default. Prints a summary (percent) and, "
                    "with --out, writes the full report as JSON (fractions in [0, 1]). Class names are the "
                    "checkpoint's own unless --class-names names a dataset's.")
    add_eval_arguments(parser)
    add_scaleout_arguments(parser, torchrun_batches=False)
    parser.set_defaults(func=run)


def add_eval_arguments(parser) -> None:
    """The ``segformer-fast eval`` options (``run`` takes the parsed namespace)."""
    parser.add_argument("--model", required=True, metavar="SRC", help=MODEL_HELP)
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
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--compare", choices=["reference", "transformers"],
                        help="also evaluate this model (same device, dtype, resize and mode) and report both mIoUs "
                             "and the pixel agreement")
    parser.add_argument("--out", metavar="JSON", help="write the full report (per-class IoU/Acc, as fractions in "
                        "[0, 1]) to this file (missing folders are created)")
    parser.add_argument("--class-names", choices=sorted(DATASET_CLASS_NAMES), metavar="DATASET",
                        help="show the classes with this dataset's names (ade20k, cityscapes) instead of the "
                             "checkpoint's own")
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


def checked_settings(args) -> tuple:
    """(SegmentSettings, settings for the report): every option checked once, before any work (ValueError)."""
    check_positive(args.limit, "--limit")
    resize = check_resize(resize_from_args(args))
    window = window_from_args(args)
    if window:
        resolve_window(window["crop"], window["stride"])
    check_scaleout_arguments(args, torchrun_batches=False)
    if args.compare and wants_scaleout(args):
        raise ValueError("--compare runs in one process only; drop it with --ray or torchrun")
    if args.out:
        check_output_file(args.out, "--out report")
        check_can_create(Path(args.out).parent, "--out report in")
    settings = SegmentSettings(model=str(args.model), engine=args.engine, dtype=args.dtype, size=resize.get("size"),
                               short_side=resize.get("short_side"), max_long_side=resize.get("max_long_side"),
                               mode=args.mode, **window)
    report_settings = {
        "model": str(args.model), "engine": args.engine, "mode": args.mode,
        **{key: list(value) for key, value in window.items()},
        "resize": {key: list(value) if isinstance(value, tuple) else value for key, value in resize.items()},
        "dtype": args.dtype, "limit": args.limit,
    }
    return settings, report_settings


def run(args) -> int:
    """Check, open the dataset, evaluate on the chosen executor (each checks the class count first, from the
    checkpoint's config only), print, write the report."""
    settings, report_settings = checked_settings(args)
    if not wants_scaleout(args):
        resolve_device(args.device)
    dataset = open_dataset(args.format, args.data, args.limit)
    names = class_names(checkpoint_class_names(args.model), dataset.num_classes, args.class_names)
    dataset = dataclasses.replace(dataset, class_names=tuple(names))
    start = time.perf_counter()
    if torchrun_world() is not None:
        result, where = evaluate_torchrun(dataset, settings, device=args.device, progress=not args.quiet)
        where = f"on {where}"
    elif getattr(args, "ray", None) is not None:
        pool = ray_pool(args)
        result = evaluate_with_ray(dataset, settings, progress=not args.quiet, **pool)
        where = f"on Ray, {plural(pool['workers'], 'worker')}"
    else:
        device = resolve_device(args.device)
        note_half_precision_on_cpu(device, parse_dtype(args.dtype))
        result = evaluate_in_process(dataset, settings, device=device, compare=args.compare,
                                     progress=not args.quiet)
        where = f"on {device}"
    if result is None:  # a torchrun rank other than 0
        return 0
    seconds = time.perf_counter() - start
    placement = {"scale_out": where[3:]} if wants_scaleout(args) else {"device": where[3:]}
    result["settings"] = {**report_settings, **placement, "compare": args.compare}
    window = f" (crop {settings.crop}, stride {settings.stride})" if settings.mode == "slide" else ""
    images = result["counts"]["images"]
    print(f"{args.format} {args.data}: {args.engine} engine, {args.mode} mode{window}, {args.dtype} {where}")
    print(format_summary(result))
    print(f"{plural(images, 'image')} in {seconds:.1f} s: {images / seconds if seconds > 0 else math.nan:.2f} "
          "images/s")
    if args.out:
        write_report(result, args.out)
        print(f"report written to {args.out}")
    return 0
