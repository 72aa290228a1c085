"""The benchmark's results files and rows: merging, names, the results folder, output streams, the paper protocol's
rows, the precision a row ran in, the registered runners and the CPU's name and ISA."""

import datetime
import io
import json
from pathlib import Path

import bench_model as bench
import pytest
import torch

import bench_common
from bench_support import fake_factory
from helpers import ROOT


def test_existing_results_are_merged_or_kept(tmp_path, registry):
    bench.register_runner("fake", fake_factory([]))
    out = tmp_path / "r.json"
    base = ["--quick", "--runners", "fake", "--out", str(out)]
    assert bench.main(base + ["--batch", "1", "2"]) == 0
    first = json.loads(out.read_text())["rows"]
    assert bench.main(base + ["--batch", "2", "3"]) == 0  # same device and versions: merged, batch 2 replaced
    merged = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in merged] == [1, 2, 3]
    assert merged[0] == first[0] and merged[1]["first_call_s"] != first[1]["first_call_s"]

    other = json.loads(out.read_text())
    other["versions"]["torch"] = "0.0.1"
    out.write_text(json.dumps(other))
    assert bench.main(base + ["--batch", "1"]) == 0  # other versions: a new name, the old file untouched
    assert json.loads(out.read_text()) == other
    assert [r["batch"] for r in json.loads((tmp_path / "r-2.json").read_text())["rows"]] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-2.json", "r.json"]

    assert bench.main(base + ["--batch", "4", "--overwrite"]) == 0
    assert [r["batch"] for r in json.loads(out.read_text())["rows"]] == [4]


def test_default_out_path_names_device_and_date(tmp_path):
    path = bench.default_out_path(torch.device("cpu"), root=tmp_path)
    assert path.parent == tmp_path
    assert path.name.endswith(f"-{datetime.date.today().isoformat()}.json")
    assert path.name.startswith(bench_common.device_slug(torch.device("cpu")))
    assert "cpu" in path.name and " " not in path.name
    # by default outside the repository (a plain `make bench` leaves no untracked file); committed results are
    # written on purpose with --out benchmarks/results/...
    default = bench.default_out_path(torch.device("cpu"))
    assert default.parent == bench_common.RESULTS_DIR
    assert ROOT not in default.resolve().parents


def test_results_dir_follows_the_environment(monkeypatch, tmp_path):
    import importlib

    import bench_common.harness as harness

    monkeypatch.setenv("SEGFORMER_FAST_RESULTS", str(tmp_path))
    try:
        assert importlib.reload(harness).RESULTS_DIR == tmp_path
    finally:
        monkeypatch.delenv("SEGFORMER_FAST_RESULTS")
        importlib.reload(harness)


def test_console_output_survives_a_non_utf8_stream():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    bench_common.say("B0  —  × transformers", stream)
    stream.seek(0)
    assert stream.read() == "B0  ?  ? transformers\n"


def test_paper_protocol_rows(tmp_path, registry, capsys):
    """--paper: fp32, batch 1, only the paper's (variant, resolution) pairs, timed through full-resolution labels."""
    calls = []
    bench.register_runner("fake", fake_factory(calls))
    out = tmp_path / "paper.json"
    assert bench.main(["--paper", "--runners", "fake", "--variants", "b0", "b5", "--resolutions", "ade", "ade640",
                       "--repeats", "1", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # B0 at 512x512 and B5 at 640x640 only: the paper has no B0 at 640 and no B5 at 512
    assert [(r["variant"], r["height"], r["batch"], r["dtype"]) for r in rows] == [("b0", 512, 1, "fp32"),
                                                                                  ("b5", 640, 1, "fp32")]
    assert all(r["protocol"] == "paper" and r["status"] == "ok" for r in rows)
    assert [r["paper_v100_fps"] for r in rows] == [50.5, 9.8]
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps its legend
    assert "fp32 paper" in printed and "rows marked \"paper\" follow that protocol" in printed
    assert "not a like-for-like comparison" not in printed  # every row with a paper FPS is a paper row
    assert bench.main(["--paper", "--batch", "2", "--runners", "fake", "--no-save"]) == 2


def test_labels_on_host_returns_full_resolution_labels_on_the_cpu():
    logits = torch.randn(1, 5, 4, 6)
    labels = bench_common.labels_on_host(lambda pixels: logits, engine_labels=False)(torch.zeros(1, 3, 13, 21))
    assert labels.shape == (1, 13, 21) and labels.device.type == "cpu" and labels.dtype == torch.int64
    up = torch.nn.functional.interpolate(logits, size=(13, 21), mode="bilinear", align_corners=False)
    assert torch.equal(labels, up.argmax(1))


def test_row_precision_says_what_ran():
    cuda = torch.device("cuda")
    assert bench_common.row_precision(lambda x: x, "fp16", cuda) == ("fp16", None)
    assert bench_common.row_precision(lambda x: x, "fp32", torch.device("cpu")) == ("fp32", None)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # torch's flags are properties (monkeypatch cannot restore them)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        text, tf32 = bench_common.row_precision(lambda x: x, "fp32", cuda)
        assert text == "fp32 with TF32 cuDNN convs" and tf32 == {"matmul": False, "cudnn": True}

        def engine(x):
            return x

        engine.tf32 = False  # the engine runs fp32 with TF32 off itself
        assert bench_common.row_precision(engine, "fp32", cuda)[0] == "fp32 (IEEE, TF32 off)"
        torch.backends.cudnn.allow_tf32 = False
        assert bench_common.row_precision(lambda x: x, "fp32", cuda) == ("fp32 (IEEE, TF32 off)",
                                                                        {"matmul": False, "cudnn": False})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_new_runners_are_registered_and_tensorrt_skips_with_a_reason():
    assert bench.RUNNER_DEFAULT_ON["compile-ro"] == ("cuda",) and bench.RUNNER_DEFAULT_ON["trt-ours"] == ("cuda",)
    with pytest.raises(bench.RunnerUnavailable, match="tensorrt is not importable|CUDA devices only|fp16 only"):
        bench.RUNNERS["trt-ours"]("b0", 150, torch.device("cpu"), torch.float16)


def test_results_name_the_cpu_and_its_isa():
    host = bench_common.environment(torch.device("cpu"))["host"]
    assert host["cpu"] == bench_common.device_name(torch.device("cpu"))
    assert set(host["cpu_isa"]) <= set(bench_common.ISA_FLAGS)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert all(flag in flags for flag in host["cpu_isa"])
    if "avx512f" in flags:
        assert "avx512f" in host["cpu_isa"]
