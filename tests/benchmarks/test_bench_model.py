"""benchmarks/bench_model.py on the CPU with tiny settings: a quick run end to end, custom and failing runners, its
options, defaults and paper numbers, compile failures, the runtime runners. No timing assertions (speed is shown by
the benchmark, never asserted here); pytest puts benchmarks/ on the import path (pyproject.toml)."""

import datetime
import json

import bench_model as bench
import pytest
import torch

from bench_common import runners
from bench_support import HAS_TRANSFORMERS, ROW_FIELDS, fake_factory


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
    bench.register_runner("fake", fake_factory(calls))
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
        bench.register_runner("reference", runners.reference_runner)
    with pytest.raises(ValueError, match="runner name"):
        bench.register_runner("has space", runners.reference_runner)
    with pytest.raises(TypeError, match="callable"):
        bench.register_runner("x", 42)
    bench.register_runner("reference", runners.reference_runner, replace=True)


def test_failing_rows_are_recorded_and_the_run_goes_on(tmp_path, registry, capsys):
    bench.register_runner("unavailable", fake_factory([], fail="unavailable"))
    bench.register_runner("oom", fake_factory([], fail="oom"))
    bench.register_runner("badshape", fake_factory([], fail="shape"))
    bench.register_runner("good", fake_factory([]))
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
