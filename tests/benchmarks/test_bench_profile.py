"""benchmarks/profile_cpu.py and bf16_agreement.py on the CPU with tiny settings: their results and their checks of
the options before any work."""

import datetime
import json

import bf16_agreement
import profile_cpu
import pytest
import torch

from segformer_fast.ops import extension as ops

from bench_common import op_profile


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
    assert list(categories) == list(op_profile.CATEGORIES)
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

    counted = sum(expected[name] for name in ("gemm", "patch-embed conv", "depthwise conv", "attention kernel")
                  if name in expected)
    assert row["flops_per_forward"] == counted
    if ceiling["onednn_gflops_per_s"]:
        assert row["floor_ms"] == pytest.approx(counted / (ceiling["onednn_gflops_per_s"] * 1e6))
        assert row["floor_fraction"] == pytest.approx(row["floor_ms"] / row["latency_ms"])
        assert "floor ÷ latency" in printed

    top = row["top_ops"]
    assert 1 <= len(top) <= op_profile.TOP_OPS
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
