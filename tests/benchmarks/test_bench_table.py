"""The benchmark's results table (bench_common.table, make_table.py): values, the script, the README's table from
the saved CPU results, skipped rows, the legend and marks."""

import importlib.util
import json
import subprocess
import sys

import bench_model as bench
import make_table
import pytest

import bench_common
from bench_support import ROWS, markdown_table_rows, result_row, results_document
from helpers import ROOT


def test_format_table_values():
    table = bench.format_table(bench.add_ratios([dict(r) for r in ROWS]))
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["variant", "resolution", "batch", "dtype", "runner"]
    assert "peak alloc GB" in lines[0] and "× transformers" in lines[0] and "paper V100 FPS" in lines[0]
    assert "labels = fp32 ref %" in lines[0]
    # the console leaves p90, TFLOP/s and the paper's GFLOPs to the results file and the README's tables
    assert not any(name in lines[0] for name in ("p90 ms", "TFLOP/s", "paper GFLOPs"))
    assert lines[2].split() == ["B0", "512x512", "1", "fp32", "reference", "200", "5.00", "1.25", "2.00", "100.0",
                                "0.50", "50.5"]
    assert lines[3].split()[4:6] == ["transformers", "100"] and lines[3].split()[8:11] == ["1.00", "90.0", "‡"]
    assert lines[4].split() == ["B0", "512x512", "1", "fp32", "compile", "OOM"] + ["—"] * 5 + ["50.5"]
    # a row without the field (an older results file) shows "—"
    assert lines[5].split() == ["B2", "512x512", "16", "fp16", "reference", "30.0", "533", "1.25", "—", "—", "0.50",
                                "—"]
    assert all(len(line) <= bench_common.CONSOLE_WIDTH for line in lines[6:])
    assert " ".join(line.strip() for line in lines[6:9]) == (
        "* B0 512x512 batch 1 fp32 transformers: labels agree with the fp32 reference on 90.0 % of pixels only: a "
        "speed of a graph that no longer computes the same model (random weights give flat logits, so int8 agreement "
        "is low; see benchmarks/README.md)")
    assert "* B0 512x512 batch 1 fp32 compile: OOM" in lines
    assert "‡ after a labels %: below the 95% floor" in table


def test_make_table_script(tmp_path, capsys):
    source = tmp_path / "nvidia-h200-2026-01-02.json"
    source.write_text(json.dumps(results_document(ROWS)))
    md = tmp_path / "table.md"
    assert make_table.main([str(source), "--out", str(md)]) == 0
    text = md.read_text()
    assert make_table.main([str(source)]) == 0
    assert capsys.readouterr().out == text
    assert text.startswith("_NVIDIA H200 · python 3.11.7, torch 2.11.0, triton 3.6.0 · 2026-01-02 · 16 torch threads")
    header, rows = markdown_table_rows(text)
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
    source = ROOT / "benchmarks" / "results" / "cpu-intel-xeon-2026-12-06.json"
    assert make_table.main(["--only-run", str(source)]) == 0
    rendered = capsys.readouterr().out.splitlines()
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in rendered if line.startswith("| B")]
    assert len(rows) == 56  # B0 and B2, batch 1 and 4: 9 runners in fp32, 5 that run bf16
    assert sum(line.startswith("- not run: ") for line in rendered) == 4  # ONNX Runtime and the int8 runners in bf16
    assert sum("‡" in line for line in rows) == 8  # the int8 rows, below the agreement floor
    start = readme.index(rendered[0])
    assert readme[start:start + len(rendered)] == rendered


def test_make_table_only_run_leaves_out_skipped_rows_and_names_why(tmp_path, capsys):
    source = tmp_path / "cpu-2026-01-02.json"
    rows = [result_row("engine", 30.0),
            result_row("ort-ours", None, dtype="bf16", status="skipped", reason="no bf16 ONNX"),
            result_row("ort-ours", None, dtype="bf16", batch=4, status="skipped", reason="no bf16 ONNX"),
            result_row("compile", None, status="OOM")]
    source.write_text(json.dumps(results_document(rows)))
    assert make_table.main(["--only-run", str(source)]) == 0
    text = capsys.readouterr().out
    _, table = markdown_table_rows(text)
    assert [(r["runner"], r["images/s"]) for r in table] == [("engine", "30.0"), ("compile", "OOM")]
    assert text.count("- not run: ort-ours bf16: no bf16 ONNX") == 1
    assert make_table.main([str(source)]) == 0
    assert len(markdown_table_rows(capsys.readouterr().out)[1]) == 4


def test_table_legend_and_marks():
    base = {"variant": "b0", "height": 512, "width": 512, "batch": 1, "runner": "engine", "status": "ok",
            "images_per_s": 10.0, "latency_ms": 100.0, "latency_p90_ms": 110.0, "peak_mem_gb": 0.1,
            "first_call_s": 1.0, "achieved_tflops": 0.2, "paper_gflops": 8.4, "paper_v100_fps": 50.5,
            "peak_mem_kind": "cpu_rss_hwm_increase"}
    rows = [dict(base, dtype="fp16"), dict(base, dtype="fp32", tf32={"matmul": True, "cudnn": False},
                                          runner="reference"), dict(base, dtype="fp32", cuda_graph=False)]
    text = " ".join(line.strip() for line in bench.format_table(rows).splitlines())  # the legend is wrapped
    for words in ("peak RSS Δ GB: rise of", "1st call s: the first call alone",
                  "paper V100 FPS: the paper's V100, fp32, batch 1", "not a like-for-like comparison",
                  "†: fp32 with TF32", "‡: the engine's CUDA graph of this shape was not captured"):
        assert words in text, words
    # the console has no TFLOP/s column, so no line for it; the README's tables (the same legend) have both
    assert "TFLOP/s" not in text
    assert any(line.startswith("TFLOP/s: achieved") for line in bench_common.table_legend(rows))
    assert "fp32 †" in text and "engine ‡" in text
    assert "†" not in bench.format_table(rows[:1]) and "like-for-like" in bench.format_table(rows[:1])
