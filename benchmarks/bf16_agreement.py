"""How closely a bf16 engine follows the fp32 engine: label agreement and logit error on random images.

    python benchmarks/bf16_agreement.py                       # B0 and B2, 8 random 512x512 images each
    python benchmarks/bf16_agreement.py --quick --no-save     # a smoke run

For each variant a random model (fixed seed) is optimized twice, in fp32 and in bf16, on the same device; the same
random images (normal pixels, as preprocessed images are) run through both. Reported per variant: the share of
full-resolution pixels whose label (``upsample_argmax`` of the logits) is the same, the mean and the maximum
absolute logit difference, and the largest |logit| (the scale the tolerance rule uses). Random weights give flat,
close logits, so this agreement is a pessimistic stand-in for a trained checkpoint's. Results go to
``benchmarks/results/bf16-agreement-<device>-<date>.json`` (measure anywhere: nothing here is timed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from segformer_fast.core.fileio import check_output_file
from segformer_fast.engine.engine import optimize
from segformer_fast.model.config import VARIANTS
from segformer_fast.model.segformer import Segformer
from segformer_fast.ops import extension as ops

from bench_common import (
    default_results_path,
    device_argument,
    environment,
    flatten,
    list_argument,
    positive_int,
    say,
    write_json,
)

SCHEMA = "segformer-fast/bf16-agreement/v1"


@torch.no_grad()
def agreement_row(variant: str, images: int, size: int, device: torch.device, seed: int = 0) -> dict:
    """The agreement of a bf16 and an fp32 engine of one random model over ``images`` random size x size inputs."""
    model = Segformer.from_config(variant, num_labels=150, seed=seed).to(device)
    fp32, bf16 = optimize(model, dtype=torch.float32), optimize(model, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed + 1)
    same = total = 0
    abs_sum, abs_max, logit_max, elements = 0.0, 0.0, 0.0, 0
    for _ in range(images):
        pixels = torch.randn(1, 3, size, size, generator=generator).to(device)
        logits32 = fp32(pixels).float()
        logits16 = bf16(pixels.to(torch.bfloat16)).float()
        difference = (logits16 - logits32).abs()
        abs_sum += float(difference.sum())
        abs_max = max(abs_max, float(difference.max()))
        logit_max = max(logit_max, float(logits32.abs().max()))
        elements += difference.numel()
        labels32 = ops.upsample_argmax(logits32, size, size)
        labels16 = ops.upsample_argmax(logits16, size, size)
        same += int((labels32 == labels16).sum())
        total += labels32.numel()
    return {"variant": variant, "images": images, "height": size, "width": size,
            "pixel_agreement": same / total, "mean_abs_logit_difference": abs_sum / elements,
            "max_abs_logit_difference": abs_max, "max_abs_logit": logit_max}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", type=list_argument("variant", lambda: list(VARIANTS)),
                        default=None, metavar="V", help="b0..b5 (default: b0 b2)")
    parser.add_argument("--images", type=positive_int, default=8, help="random images per variant (default 8)")
    parser.add_argument("--size", type=positive_int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--device", type=device_argument, default=device_argument("cpu"),
                        help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/bf16-agreement-"
                                                 "<device>-<YYYY-MM-DD>.json; replaced)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: b0, 1 image of 64x64")
    args = parser.parse_args(argv)
    variants = flatten(args.variants) or (["b0"] if args.quick else ["b0", "b2"])
    images, size = (1, 64) if args.quick else (args.images, args.size)
    out = None
    if not args.no_save:
        out = args.out or default_results_path(args.device, prefix="bf16-agreement-")
        check_output_file(out, "--out results file")  # before the work, not after it
    rows = []
    for variant in variants:
        row = agreement_row(variant, images, size, args.device)
        rows.append(row)
        say(f"{variant} {size}x{size}, {images} random images: labels agree on {100 * row['pixel_agreement']:.2f} % "
            f"of pixels; |bf16 - fp32| logits mean {row['mean_abs_logit_difference']:.4f}, max "
            f"{row['max_abs_logit_difference']:.4f} (max |logit| {row['max_abs_logit']:.2f})")
    if out is not None:
        command = shlex.join(["bf16_agreement.py", *(argv if argv is not None else sys.argv[1:])])
        write_json(Path(out), {"schema": SCHEMA, **environment(args.device), "settings": {"command": command},
                               "rows": rows})
        say(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
