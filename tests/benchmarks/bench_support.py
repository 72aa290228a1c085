"""What the benchmark tests share: fake runners (shaped logits, the fp32 reference's, recording their calls), result
rows and documents, and reading a markdown table."""

import importlib.util
import math

import bench_model as bench
import torch

from bench_common import runners

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


ROW_FIELDS = {"variant", "height", "width", "batch", "dtype", "runner", "images_per_s", "latency_ms",
              "latency_p90_ms", "peak_mem_gb", "status", "num_labels", "first_call_s", "repeats"}


def fake_factory(calls, *, fail=None):
    """A runner whose callable returns correctly shaped logits and records what it was given."""

    def factory(variant, num_labels, device, dtype):
        calls.append(("build", variant, num_labels, device, dtype))
        if fail == "unavailable":
            raise bench.RunnerUnavailable("fake runner needs a flux capacitor")

        def run(pixel_values):
            calls.append(("call", tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device.type))
            if fail == "oom":
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
            if fail == "shape":
                return torch.zeros(1, 1, 1, 1)
            batch, _, height, width = pixel_values.shape
            return torch.zeros(batch, num_labels, math.ceil(height / 4), math.ceil(width / 4))

        run.notes = "fake"
        return run

    return factory


def result_row(runner, ips, *, variant="b0", height=512, width=512, batch=1, dtype="fp32", status="ok", reason=None,
         agreement=None):
    latency = None if ips is None else batch / ips * 1e3
    paper = bench.PAPER_V100.get((variant, height, width, 150), (None, None))
    return {"variant": variant, "height": height, "width": width, "num_labels": 150, "batch": batch, "dtype": dtype,
            "runner": runner, "status": status, "reason": reason, "images_per_s": ips, "latency_ms": latency,
            "latency_p90_ms": None if ips is None else latency * 1.1, "first_call_s": 0.5 if ips else None,
            "peak_mem_gb": 1.25 if ips else None, "peak_mem_kind": "cuda_max_allocated",
            "achieved_tflops": None if ips is None else 2 * 8.4 * ips / 1e3, "paper_gflops": paper[0],
            "paper_v100_fps": paper[1], "output_finite": True,
            **({} if agreement is None else {"label_agreement": agreement})}


def results_document(rows):
    return {"schema": bench.SCHEMA, "device": "NVIDIA H200", "versions": {"python": "3.11.7", "torch": "2.11.0",
            "triton": "3.6.0", "transformers": None}, "date": "2026-01-02",
            "settings": {"threads": 16, "repeats": 50, "warmup": 10}, "rows": rows}


def markdown_table_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


ROWS = [
    result_row("reference", 200.0, agreement=1.0),
    result_row("transformers", 100.0, agreement=0.9),
    result_row("compile", None, status="OOM"),
    result_row("reference", 30.0, variant="b2", batch=16, dtype="fp16"),
]


# ------------------------------------------------------- label agreement, interleaving, int8, OpenVINO's precision hint


def reference_factory(transform=None):
    """A runner computing the fp32 reference's logits (B, K, h, w) itself, optionally transformed."""

    def factory(variant, num_labels, device, dtype):
        model = runners.reference_runner(variant, num_labels, device, torch.float32)

        def run(pixel_values):
            logits = model(pixel_values.float())
            return logits if transform is None else transform(logits)

        return run

    return factory


def recording_factory(log, name, *, fake_ms=1.0, fail_on_call=None):
    """A runner that appends (name, call number) to ``log`` on every call; its ``fake_ms`` is what the patched
    clock reports for its timed calls. It raises on call number ``fail_on_call``."""

    def factory(variant, num_labels, device, dtype):
        def run(pixel_values):
            run.calls += 1
            log.append(name)
            if run.calls == fail_on_call:
                raise RuntimeError(f"{name} broke on call {run.calls}")
            batch, _, height, width = pixel_values.shape
            return torch.zeros(batch, num_labels, math.ceil(height / 4), math.ceil(width / 4))

        run.calls = 0
        run.fake_ms = fake_ms
        return run

    return factory
