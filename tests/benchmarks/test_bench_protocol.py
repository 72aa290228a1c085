"""How the model benchmark times its runners (bench_common.protocol): label agreement with the fp32 reference,
interleaved rounds and their budget, row-by-row timing, int8 runners in the fp32 row, OpenVINO's precision hint, the
paper rows' full-resolution labels."""

import json

import bench_model as bench
import pytest
import torch

import bench_common
from bench_common import runtimes
from bench_support import fake_factory, recording_factory, reference_factory


def test_label_agreement_with_the_fp32_reference(tmp_path, registry, capsys):
    # rolling the class dimension by one turns every label l into l + 1 (mod K): no pixel agrees
    bench.register_runner("same", reference_factory())
    bench.register_runner("permuted", reference_factory(lambda logits: logits.roll(1, dims=1)))
    out = tmp_path / "agreement.json"
    assert bench.main(["--quick", "--runners", "same", "permuted", "--batch", "2", "--out", str(out)]) == 0
    same, permuted = json.loads(out.read_text())["rows"]
    assert same["label_agreement"] == 1.0
    assert permuted["label_agreement"] < bench_common.AGREEMENT_FLOOR and permuted["label_agreement"] == 0.0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps its footnotes
    assert "0.0 ‡" in printed and "100.0 ‡" not in printed
    assert ("* B0 64x64 batch 2 fp32 permuted: labels agree with the fp32 reference on 0.0 % of pixels only: a speed "
            "of a graph that no longer computes the same model") in printed
    rendered = bench.render_markdown(json.loads(out.read_text()))
    assert "| permuted |" in rendered and "| 0.0 ‡ |" in rendered and "| 100.0 |" in rendered


def test_label_agreement_of_failed_rows_and_old_files(tmp_path, registry):
    bench.register_runner("unavailable", fake_factory([], fail="unavailable"))
    bench.register_runner("oom", fake_factory([], fail="oom"))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "unavailable", "oom", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped", "OOM"]
    assert all("label_agreement" not in r for r in rows)
    assert bench_common.agreement_cell(None) == "—" and bench_common.agreement_cell(0.99999) == "99.9"


def test_interleaved_rounds_alternate_runners_with_a_rotating_start(tmp_path, registry, fake_clock):
    log = []
    for name, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        bench.register_runner(name, recording_factory(log, name, fake_ms=ms))
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
    bench.register_runner("a", recording_factory(log, "a"))
    bench.register_runner("b", recording_factory(log, "b", fail_on_call=3))  # first, then round 0, then round 1
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
        bench.register_runner(name, recording_factory(log, name))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--runners", "a,b", "--repeats", "50", "--max-seconds-per-row", "1e-9",
                       "--out", str(out)]) == 0
    assert [r["repeats"] for r in json.loads(out.read_text())["rows"]] == [bench_common.MIN_REPEATS] * 2


def test_no_interleave_times_row_by_row(tmp_path, registry, capsys):
    log = []
    for name in ("a", "b"):
        bench.register_runner(name, recording_factory(log, name))
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
def test_int8_runners_run_in_the_fp32_row(tmp_path, runner, modules, precision, capsys, caplog, recwarn):
    """... and quietly: no exporter note on strided slices, no quantizer line per 1-D weight, no NNCF progress bar."""
    for module in modules:
        pytest.importorskip(module, reason=f"{runner} needs {module} (the test extra installs it)")
    out = tmp_path / "int8.json"
    assert bench.main(["--quick", "--runners", runner, "--dtype", "fp32", "bf16", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert not any("Constant folding" in str(warning.message) for warning in recwarn)
    assert not any("out-of-range for weight" in record.getMessage() for record in caplog.records)
    assert "Statistics collection" not in printed.out + printed.err and "━" not in printed.out + printed.err
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
    assert (ort_bf16["status"], ort_bf16["reason"]) == ("skipped", runtimes.ORT_CPU_NO_BF16)


def test_paper_rows_compare_full_resolution_labels(tmp_path, registry):
    """--paper: the runner's full-resolution labels against the reference's through the same wrapper."""
    bench.register_runner("same", reference_factory())
    out = tmp_path / "paper.json"
    assert bench.main(["--paper", "--runners", "same", "--variants", "b0", "--resolutions", "ade", "--repeats", "1",
                       "--warmup", "1", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["protocol"] == "paper" and row["label_agreement"] == 1.0
