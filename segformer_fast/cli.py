"""The ``segformer-fast`` command: ``segment`` images, ``info`` about a checkpoint, ``eval`` mIoU on a dataset,
``init`` a random-weight checkpoint, ``export`` a model to ONNX / torch.export; ``segment`` and ``eval`` also run on
Ray (``--ray``) or under torchrun. Parsing, checking arguments, printing and exit codes; the work is done by the
package's modules. Every argument and output path is checked before a model is loaded; bad input ends with a
one-line error and exit code 2. (The benchmarks are scripts in the repository's benchmarks/ folder: ``make bench``.)"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .config import VARIANTS
from .datasets import FORMATS, default_resize, default_window, open_dataset
from .distributed import evaluate_torchrun, segment_torchrun
from .evaluation import evaluate, format_summary, write_report
from .export import export_onnx, export_program
from .fileio import check_output_file, check_output_folder, find_images, remove_stale_temporaries
from .inference import resolve_window
from .model import Segformer
from .outputs import output_stems, outputs_exist, segment_files
from .palettes import palette_for
from .predictors import ENGINES, make_predictor
from .processing import output_size
from .ray_segment import evaluate_with_ray, segment_with_ray
from .runtime import DTYPES, cpu_has_fast_bf16, parse_dtype, resolve_device
from .scaleout import SegmentSettings, check_model_classes, torchrun_world
from .serve import command as serve_command

DESCRIPTION = (
    "SegFormer inference: segment images, evaluate mIoU on ADE20K / Cityscapes, describe or create checkpoints, "
    "export to ONNX / torch.export. Run 'segformer-fast COMMAND --help' for a command's options."
)
#: ``eval``'s inference modes: a score comes from one known mode, so the fallback mode "auto" is not offered.
EVAL_MODES = ("whole", "slide")
DTYPE_HELP = ("compute dtype (default fp32). fp16 is for GPUs (on a CPU it runs, usually slower than fp32); bf16 is "
              "fast on GPUs and on CPUs with AVX512-BF16 or AMX, elsewhere slower than fp32")
#: Most names of ignored files shown in a summary line.
SHOWN_NAMES = 5


def plural(count: int, noun: str) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def note_half_precision_on_cpu(device: torch.device, dtype: torch.dtype) -> None:
    """One line on stderr when a half-precision dtype will run slowly on a CPU: fp16 always, bf16 on a CPU without
    native bf16 (``runtime.cpu_has_fast_bf16``)."""
    if device.type != "cpu" or dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_fast_bf16()):
        return
    if dtype == torch.float16:
        print("note: --dtype fp16 on CPU is usually slower than fp32 (few CPU kernels are fast in fp16); it is meant "
              "for GPUs", file=sys.stderr)
    else:
        print("note: --dtype bf16 on this CPU is usually slower than fp32 (it has no AVX512-BF16 or AMX, so bf16 is "
              "emulated)", file=sys.stderr)


def check_resize(resize: dict) -> None:
    """The checks ``preprocess`` makes on its resize arguments, made before any work (ValueError)."""
    if resize.get("short_side") is not None or resize.get("size") is not None:
        output_size(1, 1, **resize)


def segment_resize(args) -> dict:
    """``segment``'s resize arguments for ``make_predictor``: --short-side (keep ratio), --size H W, --no-resize;
    by default 512 x 512 in whole mode and the images' own resolution in slide and auto modes (huge images are what
    those modes are for). ValueError for values ``preprocess`` would refuse."""
    if args.max_long_side is not None and args.short_side is None:
        raise ValueError("--max-long-side needs --short-side")
    if args.short_side is not None:
        resize = {"short_side": args.short_side, "max_long_side": args.max_long_side, "size": None}
    elif args.no_resize or (args.size is None and args.mode != "whole"):
        resize = {"size": None}
    else:
        resize = {"size": tuple(args.size) if args.size else (512, 512)}
    check_resize(resize)
    return resize


def left_out_lines(skipped: list, ignored: list) -> list[str]:
    """Summary lines for the files of the input folders that were not images: special files (``skipped``, named on
    stderr as they were found) and files without an image extension (``ignored``)."""
    lines = []
    if skipped:
        what = "is not a regular file" if len(skipped) == 1 else "are not regular files"
        lines.append(f"skipped {plural(len(skipped), 'file')} that {what} (named above)")
    if ignored:
        names = ", ".join(str(path) for path in ignored[:SHOWN_NAMES])
        more = f" and {len(ignored) - SHOWN_NAMES} more" if len(ignored) > SHOWN_NAMES else ""
        lines.append(f"ignored {plural(len(ignored), 'file')} without an image extension: {names}{more}")
    return lines


def segment_summary(out_dir: Path, found: int, already_done: int, failed: int, skipped: list, ignored: list) -> str:
    """The lines ``segment`` ends with: what was written, what was already there, what failed, and what in the
    input folders was left out (see :func:`left_out_lines`)."""
    done_now = found - already_done - failed
    notes = [f"{already_done} already done" if already_done else "", f"{failed} failed" if failed else ""]
    notes = [note for note in notes if note]
    first = f"segmented {done_now} of {plural(found, 'image')} into {out_dir}" + (
        f" ({', '.join(notes)})" if notes else "")
    return "\n".join([first, *left_out_lines(skipped, ignored)])


def cmd_segment(args) -> int:
    """``segformer-fast segment``: label and overlay PNGs for every input image; exit 1 when any image failed."""
    resize = segment_resize(args)
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}")
    crop, stride = resolve_window(args.crop, args.stride)
    if wants_scaleout(args):
        return scaleout_segment(args)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    out_dir = Path(args.out)
    check_output_folder(out_dir, args.inputs)

    skipped, ignored = [], []
    images = find_images(args.inputs, exclude=[out_dir], skipped=skipped, ignored=ignored)
    for path, reason in skipped:
        print(f"skipped {path}: it {reason}", file=sys.stderr)
    if not images:
        print("segformer-fast: no images found in " + ", ".join(args.inputs), file=sys.stderr)
        for line in left_out_lines(skipped, ignored):
            print(line, file=sys.stderr)
        return 2
    roots = [Path(p) for p in args.inputs]
    output_stems(images, roots)  # refuses inputs that would overwrite each other's outputs
    out_dir.mkdir(parents=True, exist_ok=True)

    todo = images
    if args.skip_existing:
        removed = remove_stale_temporaries(out_dir)
        if removed:
            print(f"removed {plural(len(removed), 'temporary file')} an interrupted run left in {out_dir}")
        todo = [path for path in images if not outputs_exist(out_dir, path, roots)]
    already_done = len(images) - len(todo)
    if already_done:
        print(f"skipped {already_done} of {len(images)} images whose outputs already exist in {out_dir}")

    failures = []
    if todo:
        note_half_precision_on_cpu(device, dtype)
        model = Segformer.from_pretrained(args.model).to(device=device)
        predict = make_predictor(model, args.engine, args.mode, resize=resize, device=device, dtype=dtype,
                                 crop=crop, stride=stride)
        failures = segment_files(todo, predict, palette_for(model.config.num_labels), out_dir, roots,
                                 alpha=args.alpha, progress=not args.quiet, report_windows=True)
    print(segment_summary(out_dir, len(images), already_done, len(failures), skipped, ignored))
    if failures:
        print(f"{plural(len(failures), 'image')} failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def cmd_init(args) -> int:
    """``segformer-fast init``: a checkpoint folder with deterministic random weights, made without network."""
    folder = Path(args.folder)
    if args.num_labels < 1:
        raise ValueError(f"--num-labels must be a positive integer, got {args.num_labels}")
    check_output_folder(folder, [])
    existing = [name for name in ("config.json", "model.safetensors") if (folder / name).exists()]
    if existing:
        raise ValueError(f"{folder} already holds {' and '.join(existing)}; init never replaces a checkpoint: "
                         "choose a new or empty folder")
    Segformer.from_config(args.variant, num_labels=args.num_labels, seed=args.seed).save_pretrained(folder)
    print(f"wrote a MiT-{args.variant.upper()} checkpoint with random weights ({args.num_labels} classes, seed "
          f"{args.seed}) to {folder}: it runs every command, but its predictions mean nothing")
    return 0


def cmd_info(args) -> int:
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
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--compare", choices=["reference", "transformers"],
                        help="also evaluate this model (same device, dtype, resize and mode) and report both mIoUs "
                             "and the pixel agreement")
    parser.add_argument("--out", metavar="JSON", help="write the full report (per-class IoU/Acc) to this file "
                        "(missing folders are created)")
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
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    resize = resize_from_args(args)
    check_resize(resize)
    mode_options = window_from_args(args)
    if mode_options:
        resolve_window(mode_options["crop"], mode_options["stride"])
    if wants_scaleout(args):
        return scaleout_eval(args)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    if args.out:
        check_output_file(args.out, "--out report")
    dataset = open_dataset(args.format, args.data, args.limit)
    note_half_precision_on_cpu(device, dtype)
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
    """The settings ``segformer-fast segment`` options select, resized as :func:`segment_resize` says."""
    resize = segment_resize(args)
    return SegmentSettings(model=str(args.model), engine=args.engine, dtype=args.dtype, size=resize.get("size"),
                           short_side=resize.get("short_side"), max_long_side=resize.get("max_long_side"),
                           mode=args.mode, crop=tuple(args.crop) if args.crop else None,
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
    parser = argparse.ArgumentParser(prog="segformer-fast", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser(
        "segment", help="segment images; writes <name>_labels.png and <name>_overlay.png",
        description="Segment image files and folders (searched recursively). Each image gets <name>_labels.png "
                    "(class ids: a palette PNG in the dataset's colors for up to 256 classes, a 16-bit grayscale "
                    "PNG above that) and <name>_overlay.png under --out, mirroring the input folders. Two inputs "
                    "that would write the same outputs are refused before the run starts.")
    segment.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    segment.add_argument("--model", required=True, help="checkpoint: folder, weights file or hub id")
    segment.add_argument("--out", required=True, help="output folder (mirrors the input folders' layout; may be "
                         "inside an input folder, never an input folder itself)")
    segment.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    segment.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help=DTYPE_HELP)
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
                              "--stride), with a progress bar of the windows; auto: whole, and sliding windows (with "
                              "a warning) where whole runs out of memory, printing the choice per image")
    segment.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                         help="sliding-window size (default 1024 1024)")
    segment.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"),
                         help="sliding-window stride (default 2/3 of the crop)")
    segment.add_argument("--skip-existing", action="store_true",
                         help="skip images whose _labels.png and _overlay.png both exist, and remove the temporary "
                              "files an interrupted run left in --out (resume a run)")
    segment.add_argument("--alpha", type=float, default=0.5, help="label color weight in the overlay (0..1)")
    segment.add_argument("--quiet", action="store_true", help="no progress bars")
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

    init = commands.add_parser(
        "init", help="write a checkpoint with random weights (no network needed)",
        description="Write config.json and model.safetensors with deterministic random weights into FOLDER: a "
                    "checkpoint that every command and Segformer.from_pretrained accept, for trying the tools "
                    "offline (its predictions mean nothing). Refuses a folder that already holds a checkpoint.")
    init.add_argument("variant", choices=list(VARIANTS), help="model size")
    init.add_argument("folder", help="checkpoint folder to create (other files in it are left alone)")
    init.add_argument("--num-labels", type=int, default=150, help="number of classes (default 150, as ADE20K)")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.set_defaults(func=cmd_init)

    add_export_parser(commands)
    serve_command.add_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"segformer-fast: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
