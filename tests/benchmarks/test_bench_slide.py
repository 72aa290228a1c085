"""benchmarks/bench_slide.py on a small image: one row per (window setting, label pass), the forwards and the label
pass measured apart, the passes' labels compared, the JSON with the CPU's name and ISA."""

import json

import bench_slide
import pytest

from segformer_fast.inference.windows import resolve_window, window_grid
from segformer_fast.ops import extension


@pytest.mark.skipif(not extension.slide_argmax_available("cpu"), reason="segformer_fast._C is not built")
def test_bench_slide_times_the_forwards_and_the_label_pass_apart(tmp_path, capsys):
    out = tmp_path / "slide.json"
    assert bench_slide.main(["--size", "120", "200", "--windows", "default", "64x96/48x64", "--passes",
                             "fused,torch", "--num-labels", "19", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["host"]["cpu"] and isinstance(document["host"]["cpu_isa"], list)
    assert document["settings"] == {"variant": "b0", "num_labels": 19, "size": [120, 200], "dtype": "fp32",
                                    "threads": document["settings"]["threads"]}
    rows = document["rows"]
    assert [(row["crop"], row["stride"], row["label_pass"]) for row in rows] == [
        ([1024, 1024], [683, 683], "fused"), ([1024, 1024], [683, 683], "torch"),
        ([64, 96], [48, 64], "fused"), ([64, 96], [48, 64], "torch")]
    for row in rows:
        assert row["windows"] == len(window_grid(120, 200, *resolve_window(row["crop"], row["stride"])))
        assert row["forward_s"] > 0 and row["label_pass_s"] > 0
        assert row["label_pass_share"] == pytest.approx(row["label_pass_s"] / row["forward_s"], rel=0.05, abs=0.005)
        if row["label_pass"] == "torch":  # the same labels up to near ties
            assert 0 <= row["pixels_differing_from_fused"] <= 0.001 * 120 * 200
    printed = capsys.readouterr().out
    assert printed.count("label pass") >= 4 and f"wrote {out}" in printed


def test_bench_slide_refuses_a_bad_window_setting():
    with pytest.raises(SystemExit):
        bench_slide.parse_args(["--windows", "1024by1024"])
