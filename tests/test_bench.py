"""Tests of the benchmark scripts (benchmarks/bench_model.py, bench_common, make_table.py; pytest puts
benchmarks/ on the import path, see pyproject.toml): CPU only, tiny settings, no timing assertions (speed is shown
by the benchmark, never asserted here)."""

import datetime
import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import bench_model as bench
import bench_runners
import bench_runtimes
import bf16_agreement
import make_table
import profile_cpu
import pytest
import torch

from segformer_fast.ops import extension as ops

import bench_common

ROOT = Path(__file__).resolve().parent.parent
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

ROW_FIELDS = {"variant", "height", "width", "batch", "dtype", "runner", "images_per_s", "latency_ms",
              "latency_p90_ms", "peak_mem_gb", "status", "num_labels", "first_call_s", "repeats"}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the runner registry, so tests can register fakes without leaking them."""
    monkeypatch.setattr(bench, "RUNNERS", dict(bench.RUNNERS))
    monkeypatch.setattr(bench, "RUNNER_DEFAULT_ON", dict(bench.RUNNER_DEFAULT_ON))
    return bench.RUNNERS


def _fake_factory(calls, *, fail=None):
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


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "results" / "quick.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert list(out.parent.iterdir()) == [out], "a temporary file was left next to the results"
    results = json.loads(out.read_text())
    assert results["schema"] == bench.SCHEMA
    assert isinstance(results["device"], str) and results["device"]
    assert results["versions"]["torch"] == torch.__version__
    assert results["versions"]["python"].count(".") == 2
    assert "triton" in results["versions"] and "transformers" in results["versions"]
    assert results["date"] == datetime.date.today().isoformat()
    assert results["settings"]["threads"] == torch.get_num_threads()
    assert results["settings"]["repeats"] == 1 and results["settings"]["warmup"] == 1

    expected_runners = ["engine", "reference", "transformers"] if HAS_TRANSFORMERS else ["engine", "reference"]
    ok_rows = [r for r in results["rows"] if r["status"] == "ok"]
    assert [r["runner"] for r in ok_rows] == expected_runners  # compile is left out of --quick
    for row in ok_rows:
        assert ROW_FIELDS <= set(row)
        assert (row["variant"], row["height"], row["width"], row["batch"], row["dtype"]) == ("b0", 64, 64, 1, "fp32")
        assert row["num_labels"] == 150 and row["repeats"] == 1 and row["output_finite"] is True
        for key in ("images_per_s", "latency_ms", "latency_p90_ms", "first_call_s", "gmacs_per_image"):
            assert isinstance(row[key], float) and row[key] > 0, key
        assert row["latency_p90_ms"] >= row["latency_ms"]
        assert row["images_per_s"] == pytest.approx(1e3 / row["latency_ms"])
        assert row["peak_mem_gb"] is None or row["peak_mem_gb"] >= 0
        assert row["paper_gflops"] is None and row["paper_v100_fps"] is None  # 64x64 is no paper setting
        assert f"b0 64x64 batch 1 fp32 {row['runner']}:" in printed  # the progress line
    if HAS_TRANSFORMERS:
        assert ok_rows[2]["ratio_to_transformers"] == 1.0
        for row in ok_rows[:2]:
            assert row["ratio_to_transformers"] == pytest.approx(row["images_per_s"] / ok_rows[2]["images_per_s"])
    assert "torch threads:" in printed and "images/s" in printed and "× transformers" in printed


def test_custom_runner_called_with_right_arguments(tmp_path, registry):
    calls = []
    bench.register_runner("fake", _fake_factory(calls))
    out = tmp_path / "fake.json"
    argv = ["--quick", "--runners", "fake", "--resolutions", "64x96:19", "--batch", "1", "2", "--repeats", "2",
            "--out", str(out)]
    assert bench.main(argv) == 0
    builds = [c for c in calls if c[0] == "build"]
    assert builds == [("build", "b0", 19, torch.device("cpu"), torch.float32)]  # built once per setting, not per batch
    shapes = [c[1] for c in calls if c[0] == "call"]
    # first call + (warmup - 1 = 0) + 2 timed calls + 1 untimed call for the label agreement, per batch size
    assert shapes == [(1, 3, 64, 96)] * 4 + [(2, 3, 64, 96)] * 4
    assert all(c[2] == torch.float32 and c[3] == "cpu" for c in calls if c[0] == "call")
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runner"], r["batch"], r["num_labels"], r["status"], r["notes"]) for r in rows] == [
        ("fake", 1, 19, "ok", "fake"), ("fake", 2, 19, "ok", "fake")]
    assert all(r["repeats"] == 2 and r["ratio_to_transformers"] is None for r in rows)


def test_register_runner_rejects_duplicates_and_bad_names(registry):
    with pytest.raises(ValueError, match="already registered"):
        bench.register_runner("reference", bench_runners.reference_runner)
    with pytest.raises(ValueError, match="runner name"):
        bench.register_runner("has space", bench_runners.reference_runner)
    with pytest.raises(TypeError, match="callable"):
        bench.register_runner("x", 42)
    bench.register_runner("reference", bench_runners.reference_runner, replace=True)


def test_failing_rows_are_recorded_and_the_run_goes_on(tmp_path, registry, capsys):
    bench.register_runner("unavailable", _fake_factory([], fail="unavailable"))
    bench.register_runner("oom", _fake_factory([], fail="oom"))
    bench.register_runner("badshape", _fake_factory([], fail="shape"))
    bench.register_runner("good", _fake_factory([]))
    out = tmp_path / "r.json"
    rc = bench.main(["--quick", "--runners", "unavailable,oom", "badshape", "good", "--batch", "1", "2",
                     "--out", str(out)])
    assert rc == 1  # the wrong-shape runner is an error; skipped and OOM rows are results
    rows = json.loads(out.read_text())["rows"]
    status = {(r["runner"], r["batch"]): r["status"] for r in rows}
    assert status == {("unavailable", 1): "skipped", ("unavailable", 2): "skipped", ("oom", 1): "OOM",
                      ("oom", 2): "OOM", ("badshape", 1): "error", ("badshape", 2): "error",
                      ("good", 1): "ok", ("good", 2): "ok"}
    skipped = next(r for r in rows if r["runner"] == "unavailable")
    assert skipped["reason"] == "fake runner needs a flux capacitor" and skipped["images_per_s"] is None
    assert "expected (1, 150, 16, 16)" in next(r for r in rows if r["runner"] == "badshape")["reason"]
    printed = capsys.readouterr().out
    assert "unavailable: skipped (fake runner needs a flux capacitor)" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "b9"], "unknown variant 'b9'; valid: b0, b1, b2, b3, b4, b5"),
        (["--variants", "b0,b7"], "unknown variant 'b7'"),
        (["--resolutions", "imagenet"], "unknown resolution 'imagenet'; valid: ade (512x512, 150 labels)"),
        (["--resolutions", "0x64"], "must be positive"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'; valid: fp32, fp16, bf16"),
        (["--runners", "engine9"], "unknown runner 'engine9'; valid: engine, reference, transformers, compile"),
        (["--batch", "0"], "expected a positive integer, got 0"),
        (["--repeats", "x"], "expected a positive integer, got 'x'"),
        (["--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_defaults_and_resolutions():
    parser = bench.build_parser()
    cpu = bench.config_from_args(parser.parse_args(["--device", "cpu"]))
    assert (cpu.variants, cpu.dtypes, cpu.batches) == (["b0"], ["fp32"], [1, 2])
    assert [(r.height, r.width, r.num_labels) for r in cpu.resolutions] == [(512, 512, 150)]
    assert cpu.runners == [n for n in bench.RUNNERS if "cpu" in bench.RUNNER_DEFAULT_ON[n]]
    quick = bench.config_from_args(parser.parse_args(["--device", "cpu", "--quick", "--variants", "b1", "b2"]))
    assert quick.variants == ["b1", "b2"] and quick.repeats == 1 and "compile" not in quick.runners
    half = bench.config_from_args(parser.parse_args(["--device", "cpu", "--dtype", "bf16", "fp32,bf16"]))
    # bf16 gets a note only where the CPU emulates it; fp16 always
    assert half.dtypes == ["bf16", "fp32"]
    assert any("emulated" in note for note in half.notes) == (not bench.cpu_has_fast_bf16())
    fp16 = bench.config_from_args(parser.parse_args(["--device", "cpu", "--dtype", "fp16"]))
    assert any("fp16 on CPU is allowed but slow" in note for note in fp16.notes)
    assert bench.parse_resolution("cityscapes") == bench.Resolution("cityscapes", 1024, 2048, 19)
    assert bench.parse_resolution("768X1536:19") == bench.Resolution("768x1536:19", 768, 1536, 19)
    large = bench.BenchConfig(torch.device("cuda"), ["b0"], [], None, ["fp32"], ["reference"], 1, 1, 1.0)
    assert large.batches_for(bench.parse_resolution("ade")) == [1, 16]
    assert large.batches_for(bench.parse_resolution("cityscapes")) == [1, 8]


def test_paper_numbers_and_counted_macs():
    config = bench.BenchConfig(torch.device("cpu"), ["b0"], [], [1], ["fp32"], ["reference"], 1, 1, 1.0)
    row = bench._row_base("b0", bench.parse_resolution("ade"), 1, "fp32", "reference", config)
    assert (row["paper_gflops"], row["paper_v100_fps"]) == (8.4, 50.5)
    assert row["gmacs_per_image"] == pytest.approx(8.4, rel=0.01)  # the paper's "FLOPs" are multiply-adds
    b1 = bench._row_base("b1", bench.parse_resolution("ade"), 1, "fp32", "reference", config)
    assert (b1["paper_gflops"], b1["paper_v100_fps"]) == (15.9, None)
    city = bench._row_base("b5", bench.parse_resolution("cityscapes"), 8, "fp16", "compile", config)
    assert (city["paper_gflops"], city["paper_v100_fps"]) == (1447.6, 2.5)
    assert bench._row_base("b5", bench.parse_resolution("ade"), 1, "fp32", "x", config)["paper_gflops"] is None
    assert bench._row_base("b5", bench.parse_resolution("ade640"), 1, "fp32", "x", config)["paper_gflops"] == 183.3


def _row(runner, ips, *, variant="b0", height=512, width=512, batch=1, dtype="fp32", status="ok", reason=None,
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


def _results(rows):
    return {"schema": bench.SCHEMA, "device": "NVIDIA H200", "versions": {"python": "3.11.7", "torch": "2.11.0",
            "triton": "3.6.0", "transformers": None}, "date": "2026-01-02",
            "settings": {"threads": 16, "repeats": 50, "warmup": 10}, "rows": rows}


def _markdown_table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


ROWS = [
    _row("reference", 200.0, agreement=1.0),
    _row("transformers", 100.0, agreement=0.9),
    _row("compile", None, status="OOM"),
    _row("reference", 30.0, variant="b2", batch=16, dtype="fp16"),
]


def test_format_table_values():
    table = bench.format_table(bench.add_ratios([dict(r) for r in ROWS]))
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["variant", "resolution", "batch", "dtype", "runner"]
    assert "peak alloc GB" in lines[0] and "× transformers" in lines[0] and "paper V100 FPS" in lines[0]
    assert "labels = fp32 ref %" in lines[0]
    assert lines[2].split() == ["B0", "512x512", "1", "fp32", "reference", "200", "5.00", "5.50", "1.25", "2.00",
                                "100.0", "0.50", "3.36", "8.4", "50.5"]
    assert lines[3].split()[4:6] == ["transformers", "100"] and lines[3].split()[9:12] == ["1.00", "90.0", "‡"]
    assert lines[4].split() == ["B0", "512x512", "1", "fp32", "compile", "OOM"] + ["—"] * 7 + ["8.4", "50.5"]
    # a row without the field (an older results file) shows "—"
    assert lines[5].split() == ["B2", "512x512", "16", "fp16", "reference", "30.0", "533", "587", "1.25", "—", "—",
                                "0.50", "0.504", "62.4", "—"]
    assert lines[6] == ("* B0 512x512 batch 1 fp32 transformers: labels agree with the fp32 reference on 90.0 % of "
                        "pixels only: a speed of a graph that no longer computes the same model (random weights give "
                        "flat logits, so int8 agreement is low; see benchmarks/README.md)")
    assert lines[7] == "* B0 512x512 batch 1 fp32 compile: OOM"
    assert "‡ after a labels %: below the 95% floor" in table


def test_make_table_script(tmp_path, capsys):
    source = tmp_path / "nvidia-h200-2026-01-02.json"
    source.write_text(json.dumps(_results(ROWS)))
    md = tmp_path / "table.md"
    assert make_table.main([str(source), "--out", str(md)]) == 0
    text = md.read_text()
    assert make_table.main([str(source)]) == 0
    assert capsys.readouterr().out == text
    assert text.startswith("_NVIDIA H200 · python 3.11.7, torch 2.11.0, triton 3.6.0 · 2026-01-02 · 16 torch threads")
    header, rows = _markdown_table(text)
    assert header == ["variant", "resolution", "batch", "dtype", "runner", "images/s", "latency ms", "p90 ms",
                      "peak alloc GB", "× transformers", "labels = fp32 ref %", "1st call s", "TFLOP/s",
                      "paper GFLOPs", "paper V100 FPS"]
    assert [(r["variant"], r["runner"], r["images/s"], r["× transformers"], r["labels = fp32 ref %"])
            for r in rows] == [("B0", "reference", "200", "2.00", "100.0"), ("B0", "transformers", "100", "1.00",
                                                                          "90.0 ‡"),
                               ("B0", "compile", "OOM", "—", "—"), ("B2", "reference", "30.0", "—", "—")]
    assert "- B0 512x512 batch 1 fp32 transformers: labels agree with the fp32 reference on 90.0 % of pixels" in text
    assert rows[0]["paper GFLOPs"] == "8.4" and rows[0]["paper V100 FPS"] == "50.5"
    assert rows[3]["batch"] == "16" and rows[3]["dtype"] == "fp16" and rows[3]["paper V100 FPS"] == "—"
    assert "- B0 512x512 batch 1 fp32 compile: OOM" in text

    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SystemExit) as exit_info:
        make_table.main([str(bad)])
    assert exit_info.value.code == 2 and "not a model-benchmark results file" in capsys.readouterr().err


def test_scripts_run_from_anywhere_without_path_patches(tmp_path):
    """`python benchmarks/<name>.py` from another folder: the scripts find bench_common beside them and the package
    through its installation; none of them edits sys.path. The package itself holds no benchmark code."""
    assert importlib.util.find_spec("segformer_fast.bench") is None
    for name in ("bench_model", "bench_kernels", "bench_decoder", "ceilings", "make_table", "profile_cpu"):
        script = ROOT / "benchmarks" / f"{name}.py"
        assert "sys.path" not in script.read_text(), f"{name}.py patches sys.path"
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}.py --help failed:\n{result.stderr}"
        assert "usage:" in result.stdout


def test_saved_cpu_results_render_the_readme_table(capsys):
    """The README's CPU table is make_table.py's rendering (``--only-run``) of the saved results file, line for line."""
    source = ROOT / "benchmarks" / "results" / "cpu-amd-epyc-2026-12-02.json"
    assert make_table.main(["--only-run", str(source)]) == 0
    rendered = capsys.readouterr().out.splitlines()
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in rendered if line.startswith("| B")]
    assert len(rows) == 56  # B0 and B2, batch 1 and 4: 9 runners in fp32, 5 that run bf16
    assert sum(line.startswith("- not run: ") for line in rendered) == 4  # ONNX Runtime and the int8 runners in bf16
    assert sum("‡" in line for line in rows) == 8  # the int8 rows, below the agreement floor
    start = readme.index(rendered[0])
    assert readme[start:start + len(rendered)] == rendered


def test_existing_results_are_merged_or_kept(tmp_path, registry):
    bench.register_runner("fake", _fake_factory([]))
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


def test_compile_failure_skips_the_rows(tmp_path, monkeypatch, capsys):
    def broken_compile(model, **kwargs):
        assert kwargs == {"mode": None, "dynamic": False}  # the default mode on a CPU, static shapes

        def run(pixel_values):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "compile", "--batch", "1", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["status"]) for r in rows] == [(1, "skipped"), (2, "skipped")]
    assert rows[0]["reason"] == "torch.compile failed on cpu: RuntimeError: InductorError: no C++ compiler found"
    assert "compile: skipped (torch.compile failed on cpu" in capsys.readouterr().out
    assert bench.RUNNER_DEFAULT_ON["compile"] == ("cuda",)  # opt-in on CPU: compiling alone takes ~40 s per shape


def test_out_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "existing").mkdir()
    code = bench.main(["--quick", "--out", str(tmp_path / "existing")])
    captured = capsys.readouterr()
    assert code == 2 and "existing folder" in captured.err and "images/s" not in captured.out


def test_runtime_runners_run_on_both_exports(tmp_path, capsys):
    """ONNX Runtime and OpenVINO on our export and on transformers' own: real sessions, logits checked finite."""
    pytest.importorskip("onnxruntime", reason="the ort runners need onnxruntime (the test extra installs it)")
    pytest.importorskip("openvino", reason="the openvino runners need openvino (the test extra installs it)")
    pytest.importorskip("onnx", reason="our export writes ONNX with the onnx package")
    out = tmp_path / "runtimes.json"
    runners = ["ort-ours", "openvino-ours"]
    if HAS_TRANSFORMERS:
        runners += ["ort-transformers", "openvino-transformers"]
    assert bench.main(["--quick", "--out", str(out), "--runners", "engine", *runners]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["runner"] for row in rows] == ["engine", *runners]
    for row in rows:
        assert row["status"] == "ok" and row["output_finite"] is True, row


def _b0_floors(height: int, width: int, num_labels: int) -> dict:
    """Floors of one B0 forward on a height x width image, counted here from the config, apart from the profile's
    shape parsing: GEMM FLOPs of the folded model (per block q, the SR conv as a GEMM, k/v, the two attention GEMMs,
    o, fc1, fc2; per stage its decoder projection; the classifier), patch-embed and depthwise conv FLOPs, and the
    LayerNorms' fp32 bytes read + written (patch-embed, block and SR norms, stage norm)."""
    from segformer_fast.model.config import MLP_RATIO, PATCH_SIZES, SR_RATIOS, STRIDES, VARIANTS

    dims, depths, decoder_dim = VARIANTS["b0"]
    gemm = attention = patch_conv = depthwise = norm_elements = 0
    in_channels, stage_tokens = 3, []
    for channels, depth, ratio, kernel, stride in zip(dims, depths, SR_RATIOS, PATCH_SIZES, STRIDES):
        height = (height + 2 * (kernel // 2) - kernel) // stride + 1
        width = (width + 2 * (kernel // 2) - kernel) // stride + 1
        tokens, hidden = height * width, MLP_RATIO * channels
        kv_tokens = tokens if ratio == 1 else (max(height, ratio) // ratio) * (max(width, ratio) // ratio)
        block_gemm = (2 * tokens * channels * channels * 2  # q and o
                      + (2 * kv_tokens * ratio * ratio * channels * channels if ratio > 1 else 0)  # SR conv
                      + 2 * kv_tokens * channels * 2 * channels  # k | v
                      + 2 * 2 * tokens * channels * hidden)  # fc1 and fc2
        gemm += depth * block_gemm + 2 * tokens * channels * decoder_dim
        attention += depth * 2 * 2 * tokens * kv_tokens * channels  # q kᵀ and scores v over all heads
        patch_conv += 2 * tokens * channels * kernel * kernel * in_channels
        depthwise += depth * 2 * tokens * hidden * 9
        sr_norm_elements = kv_tokens * channels if ratio > 1 else 0
        norm_elements += 2 * tokens * channels + depth * (2 * tokens * channels + sr_norm_elements)
        in_channels = channels
        stage_tokens.append(tokens)
    gemm += 2 * stage_tokens[0] * decoder_dim * num_labels  # the classifier on the stage-1 grid
    return {"gemm": gemm, "attention": attention, "patch-embed conv": patch_conv, "depthwise conv": depthwise,
            "layer_norm bytes": 2 * norm_elements * 4}


def test_profile_cpu_quick_run(tmp_path, capsys):
    out = tmp_path / "results" / "profile.json"
    assert profile_cpu.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert list(out.parent.iterdir()) == [out], "a temporary file was left next to the results"
    results = json.loads(out.read_text())
    assert results["schema"] == profile_cpu.SCHEMA and results["device_type"] == "cpu"
    assert results["versions"]["torch"] == torch.__version__
    assert results["date"] == datetime.date.today().isoformat()
    settings = results["settings"]
    assert (settings["repeats"], settings["dtypes"], settings["latency_calls"]) == (1, ["fp32"], 10)
    assert settings["command"] == f"profile_cpu.py --quick --out {out}"
    ceiling = results["ceilings"]["fp32"]
    assert results["ceilings"]["size"] == 256 and ceiling["aten_gflops_per_s"] > 0
    assert ceiling["onednn_gflops_per_s"] is None or ceiling["onednn_gflops_per_s"] > 0

    [row] = results["rows"]
    assert (row["variant"], row["height"], row["width"], row["batch"], row["dtype"]) == ("b0", 64, 64, 1, "fp32")
    assert row["latency_ms"] > 0 and row["num_labels"] == 150
    categories = row["categories"]
    assert list(categories) == list(profile_cpu.CATEGORIES)
    for name, category in categories.items():
        assert set(category) == {"ms", "flops", "bytes", "gflops_per_s", "gb_per_s"}, name
        assert category["ms"] >= 0, name
    assert row["profiled_ms"] == pytest.approx(sum(category["ms"] for category in categories.values()))
    expected = _b0_floors(64, 64, 150)
    # attention's two GEMMs run in the extension's kv_attention op where it is built, else as oneDNN GEMMs
    fused_attention = ops._has_kernel("kv_attention", torch.device("cpu"))
    if fused_attention:
        expected["attention kernel"] = expected.pop("attention")
    else:
        expected["gemm"] += expected.pop("attention")
    for name in ("gemm", "patch-embed conv", "depthwise conv", *(("attention kernel",) if fused_attention else ())):
        assert categories[name]["flops"] == expected[name], name
        assert categories[name]["ms"] > 0, name
        assert categories[name]["gflops_per_s"] == pytest.approx(expected[name] / (categories[name]["ms"] * 1e6))
    for name in ("gemm", "patch-embed conv", "depthwise conv"):
        assert categories[name]["bytes"] is None, name
    assert categories["layer_norm"]["bytes"] == expected["layer_norm bytes"]
    assert categories["layer_norm"]["flops"] is None and categories["layer_norm"]["gb_per_s"] > 0
    assert categories["sdpa"] == {"ms": 0.0, "flops": None, "bytes": None, "gflops_per_s": None, "gb_per_s": None}
    assert categories["other"]["flops"] is None
    if fused_attention:  # the softmax runs inside the kernel
        assert categories["attention softmax"]["ms"] == 0.0
    else:
        assert categories["attention softmax"]["bytes"] > 0

    top = row["top_ops"]
    assert 1 <= len(top) <= profile_cpu.TOP_OPS
    assert [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)
    for op in top:
        assert set(op) == {"name", "input_shapes", "ms", "calls"} and isinstance(op["name"], str) and op["calls"] > 0
    assert "b0 64x64 batch 1 fp32: latency" in printed and "depthwise conv" in printed


def test_profile_cpu_checks_its_options_before_the_work(tmp_path, capsys):
    (tmp_path / "existing").mkdir()
    assert profile_cpu.main(["--quick", "--out", str(tmp_path / "existing")]) == 2
    captured = capsys.readouterr()
    assert "existing folder" in captured.err and "GEMM ceiling" not in captured.out
    with pytest.raises(SystemExit) as exit_info:
        profile_cpu.main(["--dtype", "fp16"])
    assert exit_info.value.code == 2 and "unknown dtype 'fp16'; valid: fp32, bf16" in capsys.readouterr().err


def test_bf16_agreement_quick_run(tmp_path, capsys):
    out = tmp_path / "agreement.json"
    assert bf16_agreement.main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["schema"] == bf16_agreement.SCHEMA and results["settings"]["command"].endswith(str(out))
    [row] = results["rows"]
    assert (row["variant"], row["images"], row["height"], row["width"]) == ("b0", 1, 64, 64)
    # bf16 follows fp32 closely but not exactly: labels mostly agree, logits differ a little
    assert 0.5 < row["pixel_agreement"] <= 1.0
    assert 0.0 < row["mean_abs_logit_difference"] <= row["max_abs_logit_difference"] < row["max_abs_logit"]
    assert "labels agree on" in capsys.readouterr().out


def test_bf16_agreement_checks_its_output_before_the_work(tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match="--out results file"):
        bf16_agreement.main(["--quick", "--out", str(tmp_path / "folder.json")])


def test_make_table_only_run_leaves_out_skipped_rows_and_names_why(tmp_path, capsys):
    source = tmp_path / "cpu-2026-01-02.json"
    rows = [_row("engine", 30.0), _row("ort-ours", None, dtype="bf16", status="skipped", reason="no bf16 ONNX"),
            _row("ort-ours", None, dtype="bf16", batch=4, status="skipped", reason="no bf16 ONNX"),
            _row("compile", None, status="OOM")]
    source.write_text(json.dumps(_results(rows)))
    assert make_table.main(["--only-run", str(source)]) == 0
    text = capsys.readouterr().out
    _, table = _markdown_table(text)
    assert [(r["runner"], r["images/s"]) for r in table] == [("engine", "30.0"), ("compile", "OOM")]
    assert text.count("- not run: ort-ours bf16: no bf16 ONNX") == 1
    assert make_table.main([str(source)]) == 0
    assert len(_markdown_table(capsys.readouterr().out)[1]) == 4


def test_paper_protocol_rows(tmp_path, registry, capsys):
    """--paper: fp32, batch 1, only the paper's (variant, resolution) pairs, timed through full-resolution labels."""
    calls = []
    bench.register_runner("fake", _fake_factory(calls))
    out = tmp_path / "paper.json"
    assert bench.main(["--paper", "--runners", "fake", "--variants", "b0", "b5", "--resolutions", "ade", "ade640",
                       "--repeats", "1", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # B0 at 512x512 and B5 at 640x640 only: the paper has no B0 at 640 and no B5 at 512
    assert [(r["variant"], r["height"], r["batch"], r["dtype"]) for r in rows] == [("b0", 512, 1, "fp32"),
                                                                                  ("b5", 640, 1, "fp32")]
    assert all(r["protocol"] == "paper" and r["status"] == "ok" for r in rows)
    assert [r["paper_v100_fps"] for r in rows] == [50.5, 9.8]
    printed = capsys.readouterr().out
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


def test_table_legend_and_marks():
    base = {"variant": "b0", "height": 512, "width": 512, "batch": 1, "runner": "engine", "status": "ok",
            "images_per_s": 10.0, "latency_ms": 100.0, "latency_p90_ms": 110.0, "peak_mem_gb": 0.1,
            "first_call_s": 1.0, "achieved_tflops": 0.2, "paper_gflops": 8.4, "paper_v100_fps": 50.5,
            "peak_mem_kind": "cpu_rss_hwm_increase"}
    rows = [dict(base, dtype="fp16"), dict(base, dtype="fp32", tf32={"matmul": True, "cudnn": False},
                                          runner="reference"), dict(base, dtype="fp32", cuda_graph=False)]
    text = bench.format_table(rows)
    for words in ("peak RSS Δ GB: rise of", "1st call s: the first call alone", "TFLOP/s: achieved",
                  "paper V100 FPS: the paper's V100, fp32, batch 1", "not a like-for-like comparison",
                  "†: fp32 with TF32", "‡: the engine's CUDA graph of this shape was not captured"):
        assert words in text, words
    assert "fp32 †" in text and "engine ‡" in text
    assert "†" not in bench.format_table(rows[:1]) and "like-for-like" in bench.format_table(rows[:1])


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


def test_no_benchmark_file_is_much_over_400_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (ROOT / "benchmarks").rglob("*.py")}
    assert sizes["bench_model.py"] <= 450 and max(sizes.values()) <= 460, sizes


# ------------------------------------------------------- label agreement, interleaving, int8, OpenVINO's precision hint


def _reference_factory(transform=None):
    """A runner computing the fp32 reference's logits (B, K, h, w) itself, optionally transformed."""

    def factory(variant, num_labels, device, dtype):
        model = bench_runners.reference_runner(variant, num_labels, device, torch.float32)

        def run(pixel_values):
            logits = model(pixel_values.float())
            return logits if transform is None else transform(logits)

        return run

    return factory


def test_label_agreement_with_the_fp32_reference(tmp_path, registry, capsys):
    # rolling the class dimension by one turns every label l into l + 1 (mod K): no pixel agrees
    bench.register_runner("same", _reference_factory())
    bench.register_runner("permuted", _reference_factory(lambda logits: logits.roll(1, dims=1)))
    out = tmp_path / "agreement.json"
    assert bench.main(["--quick", "--runners", "same", "permuted", "--batch", "2", "--out", str(out)]) == 0
    same, permuted = json.loads(out.read_text())["rows"]
    assert same["label_agreement"] == 1.0
    assert permuted["label_agreement"] < bench_common.AGREEMENT_FLOOR and permuted["label_agreement"] == 0.0
    printed = capsys.readouterr().out
    assert "0.0 ‡" in printed and "100.0 ‡" not in printed
    assert ("* B0 64x64 batch 2 fp32 permuted: labels agree with the fp32 reference on 0.0 % of pixels only: a speed "
            "of a graph that no longer computes the same model") in printed
    rendered = bench.render_markdown(json.loads(out.read_text()))
    assert "| permuted |" in rendered and "| 0.0 ‡ |" in rendered and "| 100.0 |" in rendered


def test_label_agreement_of_failed_rows_and_old_files(tmp_path, registry):
    bench.register_runner("unavailable", _fake_factory([], fail="unavailable"))
    bench.register_runner("oom", _fake_factory([], fail="oom"))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "unavailable", "oom", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped", "OOM"]
    assert all("label_agreement" not in r for r in rows)
    assert bench_common.agreement_cell(None) == "—" and bench_common.agreement_cell(0.99999) == "99.9"


def _recording_factory(log, name, *, fake_ms=1.0, fail_on_call=None):
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


@pytest.fixture
def fake_clock(monkeypatch):
    """time_call_ms calls the function and reports the runner's fake_ms: each row's timings are checked without
    timing anything."""
    import bench_common.protocol as protocol

    def time_call_ms(fn, device):
        fn()
        return fn.func.fake_ms  # fn is functools.partial(runner, pixel_values)

    monkeypatch.setattr(protocol, "time_call_ms", time_call_ms)


def test_interleaved_rounds_alternate_runners_with_a_rotating_start(tmp_path, registry, fake_clock):
    log = []
    for name, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        bench.register_runner(name, _recording_factory(log, name, fake_ms=ms))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "a,b,c", "--repeats", "3", "--warmup", "2", "--out", str(out)]) == 0
    first_and_warmup = ["a", "a", "b", "b", "c", "c"]
    rounds = ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    agreement_calls = ["a", "b", "c"]
    assert log == first_and_warmup + rounds + agreement_calls
    results = json.loads(out.read_text())
    assert results["settings"]["interleaved"] is True
    rows = results["rows"]
    assert [(r["runner"], r["status"], r["repeats"], r["latency_ms"], r["interleaved"]) for r in rows] == [
        ("a", "ok", 3, 1.0, True), ("b", "ok", 3, 2.0, True), ("c", "ok", 3, 3.0, True)]


def test_a_runner_failing_in_a_round_leaves_the_rounds(tmp_path, registry, fake_clock):
    log = []
    bench.register_runner("a", _recording_factory(log, "a"))
    bench.register_runner("b", _recording_factory(log, "b", fail_on_call=3))  # first, then round 0, then round 1
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "a,b", "--repeats", "4", "--out", str(out)]) == 1
    assert log == ["a", "b"] + ["a", "b"] + ["b", "a"] + ["a"] * 2 + ["a"]
    a, b = json.loads(out.read_text())["rows"]
    assert (a["status"], a["repeats"]) == ("ok", 4)
    assert (b["status"], b["reason"]) == ("error", "RuntimeError: b broke on call 3")


def test_interleaved_budget_scales_with_the_runners(tmp_path, registry):
    """Rounds stop once MIN_REPEATS are done and max_seconds_per_row x runners have passed."""
    log = []
    for name in ("a", "b"):
        bench.register_runner(name, _recording_factory(log, name))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "a,b", "--repeats", "50", "--max-seconds-per-row", "1e-9",
                       "--out", str(out)]) == 0
    assert [r["repeats"] for r in json.loads(out.read_text())["rows"]] == [bench_common.MIN_REPEATS] * 2


def test_no_interleave_times_row_by_row(tmp_path, registry, capsys):
    log = []
    for name in ("a", "b"):
        bench.register_runner(name, _recording_factory(log, name))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "a,b", "--repeats", "3", "--warmup", "2", "--no-interleave",
                       "--out", str(out)]) == 0
    # per runner: first call, one warm-up call, 3 timed calls, the agreement call
    assert log == ["a"] * 6 + ["b"] * 6
    results = json.loads(out.read_text())
    assert results["settings"]["interleaved"] is False
    assert [(r["runner"], r["repeats"], r["interleaved"]) for r in results["rows"]] == [("a", 3, False),
                                                                                       ("b", 3, False)]
    assert "(row by row)" in capsys.readouterr().out
    parser = bench.build_parser()
    assert bench.config_from_args(parser.parse_args(["--device", "cpu"])).interleave is True
    assert bench.config_from_args(parser.parse_args(["--device", "cpu", "--no-interleave"])).interleave is False


def test_row_precision_honours_the_runners_own_precision():
    def int8(x):
        return x

    int8.precision = "int8 (NNCF PTQ)"
    assert bench_common.row_precision(int8, "fp32", torch.device("cpu")) == ("int8 (NNCF PTQ)", None)
    assert bench_common.row_precision(int8, "fp32", torch.device("cuda")) == ("int8 (NNCF PTQ)", None)
    assert bench_common.row_precision(lambda x: x, "fp32", torch.device("cpu")) == ("fp32", None)


@pytest.mark.parametrize("runner, modules, precision", [
    ("ort-ours-int8", ("onnxruntime", "onnx"), "int8 (static QDQ, ORT)"),
    ("openvino-ours-int8", ("openvino", "nncf", "onnx"), "int8 (NNCF PTQ)"),
])
def test_int8_runners_run_in_the_fp32_row(tmp_path, runner, modules, precision):
    for module in modules:
        pytest.importorskip(module, reason=f"{runner} needs {module} (the test extra installs it)")
    out = tmp_path / "int8.json"
    assert bench.main(["--quick", "--runners", runner, "--dtype", "fp32", "bf16", "--out", str(out)]) == 0
    fp32, bf16 = json.loads(out.read_text())["rows"]
    assert fp32["status"] == "ok", fp32
    assert fp32["precision"] == precision and fp32["output_finite"] is True
    assert 0.0 <= fp32["label_agreement"] <= 1.0
    assert fp32["first_call_s"] > 0 and "on the row's first batch" in fp32["notes"]
    if runner == "openvino-ours-int8":
        assert "model_type=TRANSFORMER" in fp32["notes"] or "default model type" in fp32["notes"]
    assert (bf16["status"], bf16["reason"]) == ("skipped", "int8 runners run in the fp32 row only (fp32 in, fp32 "
                                                           "out, int8 inside)")


def test_openvino_precision_hint_and_bf16_row(tmp_path):
    openvino = pytest.importorskip("openvino", reason="the openvino runner needs openvino")
    pytest.importorskip("onnx", reason="our export writes ONNX with the onnx package")
    out = tmp_path / "ov.json"
    assert bench.main(["--quick", "--runners", "openvino-ours", "ort-ours", "--dtype", "fp32", "bf16",
                       "--out", str(out)]) == 0
    rows = {(r["runner"], r["dtype"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows["openvino-ours", "fp32"]["notes"].endswith("INFERENCE_PRECISION_HINT=f32")
    bf16 = rows["openvino-ours", "bf16"]
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert bf16["status"] == "ok" and bf16["notes"].endswith("(fp32), INFERENCE_PRECISION_HINT=bf16"), bf16
        assert 0.0 <= bf16["label_agreement"] <= 1.0
    else:
        assert bf16["status"] == "skipped" and "OpenVINO's CPU device has no native bf16" in bf16["reason"], bf16
    ort_bf16 = rows["ort-ours", "bf16"]
    assert (ort_bf16["status"], ort_bf16["reason"]) == ("skipped", bench_runtimes.ORT_CPU_NO_BF16)


def test_paper_rows_compare_full_resolution_labels(tmp_path, registry):
    """--paper: the runner's full-resolution labels against the reference's through the same wrapper."""
    bench.register_runner("same", _reference_factory())
    out = tmp_path / "paper.json"
    assert bench.main(["--paper", "--runners", "same", "--variants", "b0", "--resolutions", "ade", "--repeats", "1",
                       "--warmup", "1", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["protocol"] == "paper" and row["label_agreement"] == 1.0
