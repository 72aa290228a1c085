"""Decoder benchmark: the folded + fused decode head against the reference head and transformers' head.

fused     = projections at each stage's own resolution with the folded weights (segformer_fast.prepared.decoder_fold) +
            segformer_fast.ops.extension.fused_decode (upsample + sum + bias + ReLU + classifier in one op)
reference = segformer_fast.model.segformer.DecodeHead (model.decode_head)
hf        = transformers SegformerDecodeHead with the same weights (when transformers is installed)

Also the full-resolution post-processing: ops.upsample_argmax against F.interpolate(...).argmax(1).
Inputs are random stage maps of the right shapes, batch 1; fp32 on CPU (wall clock, median), fp16 on CUDA when
present (CUDA events, median). B2-B5 share every decoder shape, so they are measured once and reported for each.

    python benchmarks/bench_decoder.py --quick
    python benchmarks/bench_decoder.py --out benchmarks/results/decoder-cpu.json
"""

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F

from segformer_fast.model.config import VARIANTS, SegformerConfig
from segformer_fast.model.segformer import DecodeHead, random_init_
from segformer_fast.ops import extension as ops
from segformer_fast.prepared.decoder_fold import fold_decode_head

from bench_common import (
    collect_versions,
    console_table,
    device_argument,
    device_name,
    flatten,
    format_number,
    list_argument,
    loadavg,
    median_ms,
    positive_int,
    say,
    write_json,
)
from bench_common.folded_decode import project_features

RESOLUTIONS = {"512x512": (512, 512), "1024x2048": (1024, 2048)}
NUM_LABELS = 150


def build_heads(variant: str, device, dtype):
    config = SegformerConfig(variant=variant, num_labels=NUM_LABELS)
    head = DecodeHead(config.embed_dims, config.decoder_dim, NUM_LABELS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in head.modules():
            random_init_(module, generator)
    head = head.eval()
    folded = fold_decode_head(head, dtype=dtype, device=device)
    hf_head = None
    try:
        from transformers import SegformerConfig as HFConfig
        from transformers.models.segformer.modeling_segformer import SegformerDecodeHead
    except ImportError:
        pass
    else:
        hf_config = HFConfig(
            hidden_sizes=list(config.embed_dims), decoder_hidden_size=config.decoder_dim, num_labels=NUM_LABELS
        )
        hf_head = SegformerDecodeHead(hf_config).eval()
        state = {}
        for i, linear in enumerate(head.linear_c):
            state[f"linear_projections.{i}.proj.weight"] = linear.weight
            state[f"linear_projections.{i}.proj.bias"] = linear.bias
        state["linear_fuse.weight"] = head.linear_fuse.weight
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            state[f"batch_norm.{name}"] = getattr(head.bn, name)
        state["classifier.weight"] = head.classifier.weight
        state["classifier.bias"] = head.classifier.bias
        hf_head.load_state_dict(state)
        hf_head = hf_head.to(device=device, dtype=dtype)
    return head.to(device=device, dtype=dtype), folded, hf_head


def stage_features(variant: str, height: int, width: int, device, dtype) -> list:
    dims = VARIANTS[variant][0]
    h, w = (height + 3) // 4, (width + 3) // 4
    features = []
    for c in dims:
        features.append(torch.randn(1, c, h, w, device=device, dtype=dtype))
        h, w = (h + 1) // 2, (w + 1) // 2
    return features


def time_ms(fn, repeats: int, device) -> float:
    """Median wall-clock (CPU) or CUDA-event (GPU) milliseconds of `fn` after one warm-up call."""
    return median_ms(fn, device, repeats=repeats, warmup=1)


def run_case(variant, resolution, device, dtype, repeats):
    height, width = RESOLUTIONS[resolution]
    head, folded, hf_head = build_heads(variant, device, dtype)
    features = stage_features(variant, height, width, device, dtype)
    projected = project_features(features, folded)
    row = {"variant": variant, "resolution": resolution, "dtype": str(dtype).replace("torch.", ""), "batch": 1}
    with torch.inference_mode():
        row["reference_ms"] = time_ms(lambda: head(features), repeats, device)
        if hf_head is not None:
            row["transformers_ms"] = time_ms(lambda: hf_head(features), repeats, device)
        row["projections_ms"] = time_ms(lambda: project_features(features, folded), repeats, device)
        row["fused_decode_op_ms"] = time_ms(
            lambda: ops.fused_decode(*projected, folded.bias, folded.cls_weight, folded.cls_bias), repeats, device
        )
        row["fused_ms"] = time_ms(
            lambda: ops.fused_decode(*project_features(features, folded), folded.bias, folded.cls_weight,
                                     folded.cls_bias),
            repeats,
            device,
        )
        logits = head(features)
        row["upsample_argmax_ms"] = time_ms(lambda: ops.upsample_argmax(logits, height, width), repeats, device)
        row["eager_upsample_argmax_ms"] = time_ms(
            lambda: F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).argmax(1),
            repeats,
            device,
        )
    row["speedup_vs_reference"] = row["reference_ms"] / row["fused_ms"]
    if "transformers_ms" in row:
        row["speedup_vs_transformers"] = row["transformers_ms"] / row["fused_ms"]
    row["upsample_argmax_speedup"] = row["eager_upsample_argmax_ms"] / row["upsample_argmax_ms"]
    return row


def environment(device) -> dict:
    """The results file's header (its keys as in the saved decoder-*.json files)."""
    versions = collect_versions(device)
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": versions["torch"],
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": versions["python"],
        "platform": platform.platform(),
        "extension": ops.extension_available(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cpu":
        info["load_average"] = loadavg()
    info["transformers"] = versions["transformers"]
    return info


TABLE_HEADER = ["device", "dtype", "variant", "resolution", "reference ms", "transformers ms", "fused ms",
                "projections ms", "fused_decode ms", "× reference", "upsample_argmax ms", "eager ms"]


def table_cells(row: dict) -> list:
    """One row of the summary table (TABLE_HEADER's columns)."""
    return [row["device_type"], row["dtype"], row["variant"], row["resolution"],
            format_number(row["reference_ms"]), format_number(row.get("transformers_ms")),
            format_number(row["fused_ms"]), format_number(row["projections_ms"]),
            format_number(row["fused_decode_op_ms"]), f"{row['speedup_vs_reference']:.2f}",
            format_number(row["upsample_argmax_ms"]), format_number(row["eager_upsample_argmax_ms"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B0 and B2 at 512x512 only, few repeats (CPU smoke run)")
    parser.add_argument("--variants", nargs="+", type=list_argument("variant", lambda: sorted(VARIANTS)),
                        metavar="V", help="subset of b0..b5, comma or space separated (default: all)")
    parser.add_argument("--resolutions", nargs="+", type=list_argument("resolution", lambda: list(RESOLUTIONS)),
                        metavar="R", help=f"subset of {', '.join(RESOLUTIONS)} (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument("--device", type=device_argument, default=None,
                        help="auto, cpu, cuda or cuda:N (default: cpu, and cuda too when it is available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    say(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    variants = flatten(args.variants) or (["b0", "b2"] if args.quick else sorted(VARIANTS))
    resolutions = flatten(args.resolutions) or (["512x512"] if args.quick else list(RESOLUTIONS))
    if args.device:
        devices = [args.device]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if not ops.extension_available():
        say("warning: segformer_fast._C is not built; 'fused' runs the eager fallback", sys.stderr)

    results = []
    for device in devices:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        for resolution in resolutions:
            measured = {}
            for variant in variants:
                dims, _, decoder_dim = VARIANTS[variant]
                key = (dims, decoder_dim)
                if key in measured:
                    row = dict(measured[key], variant=variant, same_decoder_as=measured[key]["variant"])
                else:
                    repeats = args.repeats or (
                        3 if args.quick else (20 if device.type == "cuda" else (5 if resolution == "512x512" else 3))
                    )
                    row = run_case(variant, resolution, device, dtype, repeats)
                    row["repeats"] = repeats
                    row["device_type"] = device.type
                    measured[key] = row
                results.append(row)
                say(f"{device.type} {row['dtype']} {variant} {resolution}: fused {row['fused_ms']:.1f} ms, "
                    f"{row['speedup_vs_reference']:.2f}x the reference head")
    say("")
    say(console_table(TABLE_HEADER, [table_cells(row) for row in results], left_columns={0, 1, 2, 3}))
    payload = {"benchmark": "decoder", "environment": environment(devices[-1]), "results": results}
    if args.out:
        write_json(args.out, payload)
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
