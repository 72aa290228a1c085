"""Sliding-window inference, split in its two parts: the window forwards and the label pass (each window's 1/4
logits upsampled, averaged over the overlapping windows, resized and arg-maxed), measured in one process.

One image of --size H W (default 3000 4000, 12 MP), B0 with random weights and 150 classes, fp32, on the CPU
engine, through ``inference.slide.slide_labels`` (what ``engine.segment(image, size=None, mode="slide")`` runs)
once per (window setting, label pass): the forward calls are timed as they run, the label pass is the rest of the
call. Label passes: "fused" (the extension's ``slide_argmax``, the engine's on CPU) and "torch"
(``inference.slide.torch_label_pass``, the pass on CUDA and this project's CPU pass before the fused one). The
labels of the passes are compared (pixels that differ: float rounding at near ties, which random weights make
common). Prints one line per run as it finishes and a table; ``--out`` writes JSON (the CPU's name and ISA, the
load average, each run's seconds).

    python benchmarks/bench_slide.py --out /tmp/slide.json
    python benchmarks/bench_slide.py --size 3000 4000 --windows default 1024x1024/768x768 --passes fused,torch
"""

import argparse
import sys
import time

import torch

import segformer_fast
from segformer_fast.inference.slide import slide_labels, torch_label_pass
from segformer_fast.inference.windows import resolve_window, window_grid

from bench_common import console_table, environment, list_argument, loadavg, positive_int, say, write_json

PASSES = ("fused", "torch")


def window_setting(text: str) -> tuple:
    """"default" -> (None, None); "CROPHxCROPW/STRIDEHxSTRIDEW" (or "CROPHxCROPW": the default stride)."""
    if text == "default":
        return None, None
    crop, _, stride = text.partition("/")

    def pair(value):
        height, _, width = value.partition("x")
        return int(height), int(width)

    try:
        return pair(crop), pair(stride) if stride else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'default' or CROPHxCROPW[/STRIDEHxSTRIDEW], got {text!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs=2, type=positive_int, default=(3000, 4000), metavar=("H", "W"),
                        help="image height and width (default 3000 4000: 12 MP)")
    parser.add_argument("--windows", nargs="+", type=window_setting, default=["default", "1024x1024/768x768"],
                        metavar="SETTING", help="window settings: 'default' (crop 1024x1024, stride 2/3 of it) or "
                                                "CROPHxCROPW/STRIDEHxSTRIDEW (default: default 1024x1024/768x768)")
    parser.add_argument("--passes", type=list_argument("label pass", lambda: list(PASSES)), default=["fused"],
                        help=f"label passes to time, comma-separated: {', '.join(PASSES)} (default fused)")
    parser.add_argument("--variant", default="b0", help="model variant (default b0)")
    parser.add_argument("--num-labels", type=positive_int, default=150, help="classes (default 150)")
    parser.add_argument("--out", metavar="JSON", help="write the results to this file")
    args = parser.parse_args(argv)
    args.windows = [window_setting(value) if isinstance(value, str) else value for value in args.windows]
    return args


def run_once(engine, pixels, crop, stride, label_pass) -> tuple:
    """(labels, forward seconds, label-pass seconds, windows) of one slide_labels call."""
    forward_seconds = 0.0

    def timed_forward(window_pixels):
        nonlocal forward_seconds
        start = time.perf_counter()
        logits = engine.logits(window_pixels)
        forward_seconds += time.perf_counter() - start
        return logits

    height, width = pixels.shape[2:]
    start = time.perf_counter()
    with torch.inference_mode():
        labels = slide_labels(timed_forward, pixels, [(height, width)], engine.config.num_labels, crop, stride,
                              label_pass=label_pass)[0]
    total = time.perf_counter() - start
    return labels, forward_seconds, total - forward_seconds, len(window_grid(height, width, crop, stride))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    model = segformer_fast.Segformer.from_config(args.variant, num_labels=args.num_labels, seed=0)
    engine = segformer_fast.optimize(model)
    passes = {"fused": engine.label_pass, "torch": torch_label_pass}
    if "fused" in args.passes and engine.label_pass is None:
        say("bench_slide: the fused label pass needs the extension (segformer_fast._C), which is not built")
        return 2
    height, width = args.size
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    document = {**environment(device), "settings": {"variant": args.variant, "num_labels": args.num_labels,
                                                    "size": [height, width], "dtype": "fp32",
                                                    "threads": torch.get_num_threads()}, "rows": []}
    for crop, stride in args.windows:
        crop, stride = resolve_window(crop, stride)
        labels_by_pass = {}
        for name in args.passes:
            labels, forwards, label_pass, windows = run_once(engine, pixels, crop, stride, passes[name])
            labels_by_pass[name] = labels
            row = {"crop": list(crop), "stride": list(stride), "windows": windows, "label_pass": name,
                   "forward_s": round(forwards, 4), "label_pass_s": round(label_pass, 4),
                   "label_pass_share": round(label_pass / forwards, 4), "loadavg": loadavg()}
            if name != args.passes[0]:
                row["pixels_differing_from_" + args.passes[0]] = int((labels != labels_by_pass[args.passes[0]]).sum())
            document["rows"].append(row)
            say(f"crop {crop[0]}x{crop[1]} stride {stride[0]}x{stride[1]}, {windows} windows, {name} pass: forwards "
                f"{forwards:.2f} s, label pass {label_pass:.2f} s ({label_pass / forwards:.1%} of the forwards)")
            if args.out:
                write_json(args.out, document)
    say(console_table(["crop", "stride", "windows", "label pass", "forwards s", "label pass s", "share"],
                      [[f"{r['crop'][0]}x{r['crop'][1]}", f"{r['stride'][0]}x{r['stride'][1]}", str(r["windows"]),
                        r["label_pass"], f"{r['forward_s']:.2f}", f"{r['label_pass_s']:.2f}",
                        f"{r['label_pass_share']:.1%}"] for r in document["rows"]], left_columns={0, 1, 3}))
    if args.out:
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
