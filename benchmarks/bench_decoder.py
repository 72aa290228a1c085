"""Decoder benchmark: the folded + fused decode head against the reference head and transformers' head.

fused     = projections at each stage's own resolution with the folded weights (segformer_fast.decoder_fold) +
            segformer_fast.ops.fused_decode (upsample + sum + bias + ReLU + classifier in one op)
reference = segformer_fast.model.DecodeHead (model.decode_head)
hf        = transformers SegformerDecodeHead with the same weights (when transformers is installed)

Also the full-resolution post-processing: ops.upsample_argmax against F.interpolate(...).argmax(1).
Inputs are random stage maps of the right shapes, batch 1; fp32 on CPU (wall clock, median), fp16 on CUDA when
present (CUDA events, median). B2-B5 share every decoder shape, so they are measured once and reported for each.

    python benchmarks/bench_decoder.py --quick
    python benchmarks/bench_decoder.py --out benchmarks/results/decoder-cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from segformer_fast import ops  # noqa: E402
from segformer_fast.config import VARIANTS, SegformerConfig  # noqa: E402
from segformer_fast.decoder_fold import fold_decode_head, project_features  # noqa: E402
from segformer_fast.model import DecodeHead, _random_init_  # noqa: E402

RESOLUTIONS = {"512x512": (512, 512), "1024x2048": (1024, 2048)}
NUM_LABELS = 150


def build_heads(variant: str, device, dtype):
    config = SegformerConfig(variant=variant, num_labels=NUM_LABELS)
    head = DecodeHead(config.embed_dims, config.decoder_dim, NUM_LABELS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in head.modules():
            _random_init_(module, generator)
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
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


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
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "extension": ops.extension_available(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
                names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
            if names:
                info["device"] = names[0]
            info["load_average"] = os.getloadavg()
        except OSError:
            pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def write_json_atomic(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".bench_decoder-", suffix=".json", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2)
        stream.write("\n")
    os.replace(temp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B0 and B2 at 512x512 only, few repeats (CPU smoke run)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of b0..b5")
    parser.add_argument("--resolutions", default=None, help="comma-separated subset of 512x512,1024x2048")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both when CUDA is available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)

    variants = args.variants.split(",") if args.variants else (["b0", "b2"] if args.quick else sorted(VARIANTS))
    resolutions = args.resolutions.split(",") if args.resolutions else (
        ["512x512"] if args.quick else list(RESOLUTIONS)
    )
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if not ops.extension_available():
        print("warning: segformer_fast._C is not built; 'fused' runs the eager fallback", file=sys.stderr)

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
                hf = f"{row['transformers_ms']:9.1f}" if "transformers_ms" in row else "      n/a"
                print(
                    f"{device.type:4s} {row['dtype']:8s} {variant} {resolution:9s} ref {row['reference_ms']:9.1f} ms  "
                    f"hf {hf} ms  fused {row['fused_ms']:8.1f} ms (proj {row['projections_ms']:.1f} + op "
                    f"{row['fused_decode_op_ms']:.1f})  x{row['speedup_vs_reference']:.2f} vs ref  | upsample_argmax "
                    f"{row['upsample_argmax_ms']:.1f} ms vs eager {row['eager_upsample_argmax_ms']:.1f} ms",
                    flush=True,
                )
    payload = {"benchmark": "decoder", "environment": environment(devices[-1]), "results": results}
    if args.out:
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
