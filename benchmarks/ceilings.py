"""Measure the two ceilings the benchmarks are compared against: memory bandwidth (a large device-to-device copy)
and matrix throughput (a large GEMM: bf16 on CUDA, fp32 on CPU).

    python benchmarks/ceilings.py [--device cuda] [--out ceilings.json]

On CUDA it times with ``triton.testing.do_bench`` (median); on CPU with ``time.perf_counter`` (median of repeats).
The JSON holds device, versions and the two measured numbers; nothing is asserted.
"""

import argparse
import json
import platform
import sys

import torch

from bench_common import collect_versions, device_argument, device_name, do_bench_ms, median_ms, write_json


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        return do_bench_ms(fn)
    return median_ms(fn, device, repeats=repeats)


def _copy_ms(device: torch.device, copy_bytes: int, repeats: int) -> float:
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return _median_ms(lambda: target.copy_(source), device, repeats)


def measure(device: torch.device, repeats: int = 5) -> dict:
    gib = 1 << 30
    copy_bytes = 4 * gib if device.type == "cuda" else gib // 4
    copy_ms = _copy_ms(device, copy_bytes, repeats)  # buffers freed before the GEMM allocates
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    gemm_ms = _median_ms(lambda: a @ b, device, repeats)
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_gb_per_s": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,  # read + write
        "gemm_size": size,
        "gemm_dtype": str(dtype).replace("torch.", ""),
        "gemm_ms": gemm_ms,
        "gemm_tflop_per_s": 2 * size**3 / (gemm_ms * 1e-3) / 1e12,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_argument, default="auto",
                        help="auto, cpu, cuda or cuda:N (default: auto, cuda when available)")
    parser.add_argument("--out", help="write the JSON here (atomically)")
    args = parser.parse_args(argv)
    device = args.device
    result = {"device": device_name(device), "machine": platform.machine(), "versions": collect_versions(device),
              "torch_threads": torch.get_num_threads(), **measure(device)}
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
