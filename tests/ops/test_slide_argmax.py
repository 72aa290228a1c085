"""The extension's slide_argmax (the label pass of sliding-window inference) against its reference
(segformer_fast.ops.reference.slide_argmax: every window upsampled with F.interpolate, summed into the full-size
logits, divided by the window count, resized, arg-maxed): equal bit for bit, on window grids and on arbitrary
overlapping boxes, in rows, with ties and NaN, in its baseline and vectorized loops; and its input checks."""

import os
import subprocess
import sys

import pytest
import torch

from segformer_fast.inference.windows import window_grid
from segformer_fast.ops import extension as ops
from segformer_fast.ops import reference

from helpers import poison_

needs_kernel = pytest.mark.skipif(not ops.slide_argmax_available("cpu"), reason="segformer_fast._C is not built")


def random_windows(boxes, batch, num_labels, seed, up_sizes=None):
    """Window logits at about 1/4 of each window (as the model gives them) and their upsampled sizes."""
    generator = torch.Generator().manual_seed(seed)
    up_sizes = up_sizes or [(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes]
    logits = [torch.randn(batch, num_labels, -(-h // 4), -(-w // 4), generator=generator) for h, w in up_sizes]
    return logits, up_sizes


def run_kernel(logits, boxes, up_sizes, height, width, out_size, rows=None):
    batch = logits[0].shape[0]
    labels = poison_(torch.empty(batch, *out_size, dtype=torch.int64))
    rows = rows or [(0, out_size[0])]
    for begin, end in rows:
        ops.slide_argmax(logits, boxes, up_sizes, height, width, labels, begin, end)
    return labels


@needs_kernel
@pytest.mark.parametrize("height, width, crop, stride, out_size, batch, num_labels", [
    (150, 230, (96, 128), (64, 80), (150, 230), 2, 19),  # the slide size itself: no final resize
    (150, 230, (96, 128), (64, 80), (301, 97), 1, 19),  # upsampled rows, downsampled columns
    (129, 257, (96, 80), (37, 41), (200, 300), 2, 7),  # odd strides, three-fold overlaps
    (300, 200, (128, 128), (128, 128), (150, 100), 1, 5),  # stride = crop: windows meet without overlap
    (90, 120, (128, 160), (64, 64), (90, 333), 1, 1),  # one window, one class; only the width is resized
])
def test_slide_argmax_equals_the_reference(height, width, crop, stride, out_size, batch, num_labels):
    boxes = window_grid(height, width, crop, stride)
    logits, up_sizes = random_windows(boxes, batch, num_labels, seed=height + width)
    expected = reference.slide_argmax(logits, boxes, up_sizes, height, width, *out_size)
    assert torch.equal(run_kernel(logits, boxes, up_sizes, height, width, out_size), expected)
    # rows in uneven pieces (a block boundary, a single row, the rest) give the same labels
    pieces = [(0, 17), (17, 18), (18, out_size[0] // 2), (out_size[0] // 2, out_size[0])]
    assert torch.equal(run_kernel(logits, boxes, up_sizes, height, width, out_size, pieces), expected)


@needs_kernel
def test_slide_argmax_on_arbitrary_boxes_and_padded_windows():
    """Boxes in any order and overlap (the order of addition is the given one), windows upsampled beyond their box
    (padded to the crop, as the official code does), logits of a window larger than 1/4 of it."""
    height, width = 140, 170
    boxes = [(0, 140, 0, 100), (30, 90, 50, 170), (0, 70, 90, 170), (60, 140, 80, 170), (10, 50, 20, 60)]
    up_sizes = [(140, 100), (96, 128), (70, 80), (80, 90), (40, 40)]
    generator = torch.Generator().manual_seed(3)
    logits = [torch.randn(2, 11, 35, 25, generator=generator), torch.randn(2, 11, 24, 32, generator=generator),
              torch.randn(2, 11, 70, 80, generator=generator), torch.randn(2, 11, 20, 23, generator=generator),
              torch.randn(2, 11, 10, 10, generator=generator)]
    for out_size in ((140, 170), (211, 97)):
        expected = reference.slide_argmax(logits, boxes, up_sizes, height, width, *out_size)
        assert torch.equal(run_kernel(logits, boxes, up_sizes, height, width, out_size), expected)


@needs_kernel
def test_slide_argmax_ties_pick_the_first_class_and_nan_wins():
    height, width = 80, 96
    boxes = window_grid(height, width, (64, 64), (32, 32))
    logits, up_sizes = random_windows(boxes, 1, 6, seed=9)
    for window in logits:
        window[:, 4] = window[:, 2]  # classes 2 and 4 tie everywhere
        window[:, 5] = window[:, 2].clamp(max=0.0)  # and 5 ties with them where they are <= 0
    logits[0][0, 3, 2, 3] = float("nan")
    expected = reference.slide_argmax(logits, boxes, up_sizes, height, width, height, width)
    got = run_kernel(logits, boxes, up_sizes, height, width, (height, width))
    assert torch.equal(got, expected)
    assert not (got == 4).any() and not (got == 5).any()
    assert (got == 3).any()  # the NaN spreads over its window's upsampled neighbourhood and wins there


@needs_kernel
def test_slide_argmax_baseline_loops_give_the_same_labels(tmp_path):
    """SEGFORMER_FAST_CPU_BASELINE=1 (read once per process) selects the loops built for the baseline ISA: both
    builds run the same fp32 arithmetic, so a fresh process each way gives the reference's labels."""
    script = (
        "import sys, torch\n"
        "from segformer_fast.inference.windows import window_grid\n"
        "from segformer_fast.ops import extension as ops, reference\n"
        "g = torch.Generator().manual_seed(5)\n"
        "boxes = window_grid(160, 200, (96, 96), (64, 48))\n"
        "logits = [torch.randn(1, 9, 24, 24, generator=g) for _ in boxes]\n"
        "ups = [(96, 96)] * len(boxes)\n"
        "labels = torch.empty(1, 233, 171, dtype=torch.int64)\n"
        "ops.slide_argmax(logits, boxes, ups, 160, 200, labels, 0, 233)\n"
        "expected = reference.slide_argmax(logits, boxes, ups, 160, 200, 233, 171)\n"
        "print(int((labels != expected).sum()))\n"
    )
    for baseline in ("0", "1"):
        env = {**os.environ, "SEGFORMER_FAST_CPU_BASELINE": baseline}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == "0", (baseline, done.stdout)


@needs_kernel
@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "boxes": a["boxes"][:1], "logits": a["logits"][:1], "up_sizes": a["up_sizes"][:1]},
     r"pixel \(40, 0\) of the slide grid is covered by no window"),
    (lambda a: {**a, "boxes": [(0, 64, 10, 5)] + a["boxes"][1:]}, "must lie inside the 64x64 image"),
    (lambda a: {**a, "up_sizes": [(16, 16)] + a["up_sizes"][1:]}, "must be at least its"),
    (lambda a: {**a, "up_sizes": a["up_sizes"][1:]}, "2 upsampled sizes per window"),
    (lambda a: {**a, "logits": [a["logits"][0][:, :3]] + a["logits"][1:]}, "batch and classes of window 0"),
    (lambda a: {**a, "labels": torch.empty(1, 64, 64, dtype=torch.int32)}, "contiguous int64"),
    (lambda a: {**a, "rows": (10, 65)}, r"rows \[10, 65\) must lie within the 64 rows"),
])
def test_slide_argmax_input_checks(change, message):
    boxes = [(0, 40, 0, 64), (24, 64, 0, 64)]
    logits, up_sizes = random_windows(boxes, 1, 4, seed=1)
    arguments = change({"logits": logits, "boxes": boxes, "up_sizes": up_sizes,
                        "labels": torch.empty(1, 64, 64, dtype=torch.int64), "rows": (0, 64)})
    with pytest.raises(RuntimeError, match=message):
        ops.slide_argmax(arguments["logits"], arguments["boxes"], arguments["up_sizes"], 64, 64, arguments["labels"],
                         *arguments["rows"])


def test_slide_argmax_without_the_kernel_runs_the_reference(monkeypatch):
    boxes = window_grid(70, 90, (48, 64), (32, 32))
    logits, up_sizes = random_windows(boxes, 2, 5, seed=4)
    monkeypatch.setitem(ops._KERNEL_DEVICES, "slide_argmax", frozenset())
    monkeypatch.setattr(ops, "_warned", True)
    labels = run_kernel(logits, boxes, up_sizes, 70, 90, (101, 77), rows=[(0, 50), (50, 101)])
    assert torch.equal(labels, reference.slide_argmax(logits, boxes, up_sizes, 70, 90, 101, 77))
