"""The model benchmark's shared parts: named resolutions, the paper's numbers, defaults, inputs, counted
multiply-adds and result rows. ``bench_model.py`` runs the benchmark with them, ``protocol.py`` (the timing),
``agreement.py`` (labels against the fp32 reference) and ``table.py`` (the results table and its legend);
``make_table.py``, ``profile_cpu.py`` and others import them from ``bench_common``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

from segformer_fast.model.config import VARIANTS, SegformerConfig
from segformer_fast.model.segformer import Segformer

from .arguments import split_list

SCHEMA = "segformer-fast/bench-model/v1"

#: Named resolutions: (height, width, num_labels). "ade" and "cityscapes" are the paper's evaluation settings;
#: "ade640" is the paper's B5 ADE20K setting.
RESOLUTIONS = {
    "ade": (512, 512, 150),
    "ade640": (640, 640, 150),
    "cityscapes": (1024, 2048, 19),
}
DEFAULT_NUM_LABELS = 150

#: The paper's numbers (arXiv 2105.15203, Tables 1 and 2 / Table 3 real-time rows; V100, fp32, batch 1, mmseg
#: tools/benchmark.py), keyed by (variant, height, width, num_labels): (GFLOPs per image, FPS or None). The paper's
#: "FLOPs" count multiply-adds. The B0 real-time rows are Cityscapes at short side 768 / 640 / 512.
PAPER_V100 = {
    ("b0", 512, 512, 150): (8.4, 50.5),
    ("b1", 512, 512, 150): (15.9, None),
    ("b2", 512, 512, 150): (62.4, None),
    ("b3", 512, 512, 150): (79.0, None),
    ("b4", 512, 512, 150): (95.7, 15.4),
    ("b5", 640, 640, 150): (183.3, 9.8),
    ("b0", 1024, 2048, 19): (125.5, 15.2),
    ("b1", 1024, 2048, 19): (243.7, None),
    ("b2", 1024, 2048, 19): (717.1, None),
    ("b3", 1024, 2048, 19): (962.9, None),
    ("b4", 1024, 2048, 19): (1240.6, 3.0),
    ("b5", 1024, 2048, 19): (1447.6, 2.5),
    ("b0", 768, 1536, 19): (51.7, 26.3),
    ("b0", 640, 1280, 19): (31.5, 37.1),
    ("b0", 512, 1024, 19): (17.7, 47.6),
}

MIN_REPEATS = 3

#: Rows whose labels agree with the fp32 reference on fewer pixels than this get their agreement cell marked "‡" and
#: a footnote: their speed is that of a graph that no longer computes the same model. Random weights give flat
#: logits (near-ties everywhere), so bf16 stays above it and int8 often falls below (benchmarks/README.md).
AGREEMENT_FLOOR = 0.95

#: Defaults per device type. "batch" None means batch 1 and a large batch that depends on the resolution.
DEFAULTS = {
    "cpu": {"variants": ["b0"], "resolutions": ["ade"], "batch": [1, 2], "dtype": ["fp32"], "repeats": 10,
            "warmup": 2, "max_seconds_per_row": 20.0},
    "cuda": {"variants": list(VARIANTS), "resolutions": ["ade", "cityscapes"], "batch": None,
             "dtype": ["fp32", "fp16"], "repeats": 50, "warmup": 10, "max_seconds_per_row": 20.0},
}
#: The paper's protocol (--paper): its variants with a V100 FPS, each at its settings (PAPER_SETTINGS), batch 1, fp32.
PAPER_PROTOCOL = {"variants": ["b0", "b4", "b5"], "resolutions": ["ade", "ade640", "cityscapes"], "batch": [1],
                  "dtype": ["fp32"]}
QUICK = {"variants": ["b0"], "resolutions": ["64x64"], "batch": [1], "dtype": ["fp32"], "repeats": 1, "warmup": 1}
#: Runners left out of --quick unless named with --runners (compilation alone takes about a minute on a CPU).
QUICK_EXCLUDE = {"compile", "compile-max", "ort-ours", "ort-transformers", "openvino-ours", "openvino-transformers",
                 "compile-ro", "trt-ours", "ort-ours-int8", "openvino-ours-int8"}


@dataclass
class Resolution:
    name: str
    height: int
    width: int
    num_labels: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}"


def parse_resolution(spec: str) -> Resolution:
    """Parse "ade", "ade640", "cityscapes", "HxW" (150 labels) or "HxW:K" (K labels); ValueError otherwise."""
    key = spec.strip().lower()
    if key in RESOLUTIONS:
        return Resolution(key, *RESOLUTIONS[key])
    match = re.fullmatch(r"(\d+)x(\d+)(?::(\d+))?", key)
    if not match:
        named = ", ".join(f"{k} ({h}x{w}, {n} labels)" for k, (h, w, n) in RESOLUTIONS.items())
        raise ValueError(
            f"unknown resolution {spec!r}; valid: {named}, or HxW (e.g. 768x1536) or HxW:LABELS (e.g. 768x1536:19)"
        )
    height, width = int(match.group(1)), int(match.group(2))
    num_labels = int(match.group(3)) if match.group(3) else DEFAULT_NUM_LABELS
    if height < 1 or width < 1 or num_labels < 1:
        raise ValueError(f"resolution {spec!r}: height, width and labels must be positive")
    return Resolution(key, height, width, num_labels)


def resolutions_type(text: str) -> list:
    try:
        return [parse_resolution(item) for item in split_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def make_inputs(batch: int, resolution: Resolution, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The same pixel values for every runner of a setting (normal noise, like normalized images)."""
    generator = torch.Generator().manual_seed(
        seed * 1_000_003 + batch * 7919 + resolution.height * 31 + resolution.width
    )
    pixel_values = torch.randn(batch, 3, resolution.height, resolution.width, generator=generator)
    return pixel_values.to(device=device, dtype=dtype)


_GMAC_CACHE: dict = {}


def counted_gmacs(variant: str, resolution: Resolution) -> float | None:
    """Multiply-adds per image (GMAC) of the reference model, counted by torch's FlopCounterMode on the meta
    device (linear, conv and attention matmuls; FLOPs / 2). Matches the paper's GFLOPs to ~0.1 % at its settings."""
    key = (variant, resolution.height, resolution.width, resolution.num_labels)
    if key not in _GMAC_CACHE:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.device("meta"):
                model = Segformer(SegformerConfig(variant=variant, num_labels=resolution.num_labels))
                pixel_values = torch.empty(1, 3, resolution.height, resolution.width)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(pixel_values)
            _GMAC_CACHE[key] = counter.get_total_flops() / 2e9
        except Exception:  # noqa: BLE001 - the count is informative only
            _GMAC_CACHE[key] = None
    return _GMAC_CACHE[key]


def setting_key(row: dict) -> tuple:
    return (row["variant"], row["height"], row["width"], row.get("num_labels"), row["batch"], row["dtype"])


def row_key(row: dict) -> tuple:
    return setting_key(row) + (row["runner"],)


def add_ratios(rows: list) -> list:
    """Set each row's ratio_to_transformers = images/s ÷ transformers' images/s in the same setting (or None)."""
    baseline = {setting_key(r): r["images_per_s"] for r in rows
                if r["runner"] == "transformers" and r.get("status") == "ok" and r.get("images_per_s")}
    for row in rows:
        base = baseline.get(setting_key(row))
        ok = row.get("status") == "ok" and row.get("images_per_s")
        row["ratio_to_transformers"] = row["images_per_s"] / base if ok and base else None
    return rows


def paper_setting(variant, resolution: Resolution) -> bool:
    """Whether (variant, resolution) is one the paper timed (a V100 FPS in PAPER_V100)."""
    key = (variant, resolution.height, resolution.width, resolution.num_labels)
    return PAPER_V100.get(key, (None, None))[1] is not None


def labels_on_host(fn, engine_labels: bool):
    """The paper's protocol around a runner: logits, then full-resolution labels (bilinear upsampling + argmax, the
    engine through its fused ``upsample_argmax``), copied to the host."""
    from segformer_fast.ops import extension as ops

    def run(pixel_values):
        logits = fn(pixel_values)
        height, width = pixel_values.shape[-2:]
        if engine_labels:
            labels = ops.upsample_argmax(logits, height, width)
        else:
            up = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            labels = up.argmax(1)
        return labels.cpu()

    return run


def row_precision(fn, dtype_name: str, device: torch.device) -> tuple:
    """(precision, tf32): what really ran. A runner that says it itself (``fn.precision``, e.g. "int8 (NNCF PTQ)"
    for int8 inside an fp32 row) is taken at its word. fp32 on CUDA is IEEE fp32 only with TF32 off, which the engine
    forces itself (``fn.tf32 = False``) and other runners get from torch's flags at the time of the row."""
    if getattr(fn, "precision", None):
        return fn.precision, None
    if dtype_name != "fp32" or device.type != "cuda":
        return dtype_name, None
    if getattr(fn, "tf32", None) is False:
        return "fp32 (IEEE, TF32 off)", {"matmul": False, "cudnn": False}
    tf32 = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
    if not any(tf32.values()):
        return "fp32 (IEEE, TF32 off)", tf32
    on = " and ".join(name for name, value in (("matmuls", tf32["matmul"]), ("cuDNN convs", tf32["cudnn"])) if value)
    return f"fp32 with TF32 {on}", tf32


def setting_fields(variant: str, resolution: Resolution, batch: int, dtype_name: str) -> dict:
    """The fields that name a setting in every results row: variant, size, classes, batch, dtype."""
    return {"variant": variant, "height": resolution.height, "width": resolution.width,
            "num_labels": resolution.num_labels, "batch": batch, "dtype": dtype_name}


def row_base(variant, resolution: Resolution, batch, dtype_name, runner, *, device, warmup, paper=False,
             interleaved=False) -> dict:
    """A result row before its measurement: the setting, the paper's numbers there, empty measurements. Ok rows get
    ``label_agreement`` when measured; skipped and failed rows have none."""
    paper_gflops, paper_fps = PAPER_V100.get((variant, resolution.height, resolution.width, resolution.num_labels),
                                             (None, None))
    return {
        **setting_fields(variant, resolution, batch, dtype_name),
        "runner": runner,
        "status": "ok",
        "reason": None,
        "images_per_s": None,
        "latency_ms": None,
        "latency_p90_ms": None,
        "latency_min_ms": None,
        "first_call_s": None,
        "peak_mem_gb": None,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_hwm_increase",
        "gmacs_per_image": counted_gmacs(variant, resolution),
        "achieved_tflops": None,
        "paper_gflops": paper_gflops,
        "paper_v100_fps": paper_fps,
        "ratio_to_transformers": None,
        "repeats": None,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "interleaved": interleaved,
        "output_finite": None,
        "notes": None,
        "protocol": "paper" if paper else "logits",
        "precision": dtype_name,
        "tf32": None,
        "cuda_graph": None,
    }

__all__ = [
    "DEFAULTS", "PAPER_PROTOCOL", "QUICK", "QUICK_EXCLUDE",
    "SCHEMA", "RESOLUTIONS", "DEFAULT_NUM_LABELS", "PAPER_V100", "MIN_REPEATS", "AGREEMENT_FLOOR", "Resolution",
    "parse_resolution", "resolutions_type", "make_inputs", "counted_gmacs", "setting_fields", "setting_key", "row_key",
    "add_ratios", "paper_setting", "labels_on_host", "row_precision", "row_base",
]
