"""Sliding windows (segformer_fast.inference.windows, .slide): the window grid, slide_logits against a naive loop
and against whole mode, padding small windows to the crop, and the streamed slide labels."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segformer_fast import Segformer, optimize, postprocess
from segformer_fast.inference.memory import estimate_peak_memory_bytes
from segformer_fast.inference.slide import slide_labels, slide_logits, torch_label_pass
from segformer_fast.inference.windows import resolve_window, window_grid

from inference_models import NUM_LABELS, LiveTensorBytes, engine_tensors, no_grad_forward, upsampled_logits


# ---------------------------------------------------------------------------------------------- slide_logits
def test_slide_equals_whole_when_one_window_covers_the_image(model, engine):
    pixels = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    for forward in (no_grad_forward(model), engine.logits):
        expected = upsampled_logits(forward, pixels)
        assert expected.shape == (2, NUM_LABELS, 70, 90) and expected.dtype == torch.float32
        # the same labels as the whole-image path segment_images takes by default (transformers' post-processing)
        assert torch.equal(postprocess(forward(pixels), (70, 90)), expected.argmax(1))
        for crop in ((70, 90), (128, 128), (200, 90)):
            got = slide_logits(forward, pixels, NUM_LABELS, crop=crop, stride=(64, 64))
            assert torch.equal(got, expected), f"crop {crop}"


def _naive_slide(model, pixels, crop, stride):
    """Independent loop version of mmseg's slide inference."""
    _, _, height, width = pixels.shape
    total = torch.zeros(pixels.shape[0], NUM_LABELS, height, width, dtype=torch.float64)
    seen = torch.zeros(height, width, dtype=torch.float64)
    ys = list(range(0, max(height - crop[0], 0) + 1, stride[0]))
    if ys[-1] + crop[0] < height:
        ys.append(height - crop[0])
    xs = list(range(0, max(width - crop[1], 0) + 1, stride[1]))
    if xs[-1] + crop[1] < width:
        xs.append(width - crop[1])
    for y in ys:
        for x in xs:
            h, w = min(crop[0], height), min(crop[1], width)
            with torch.no_grad():
                out = model(pixels[:, :, y:y + h, x:x + w])
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            total[:, :, y:y + h, x:x + w] += out.double()
            seen[y:y + h, x:x + w] += 1
    assert (seen > 0).all()
    return (total / seen).float()


@pytest.mark.parametrize("shape, crop, stride", [
    ((1, 150, 190), (64, 64), (48, 48)),
    ((2, 100, 81), (64, 48), (40, 30)),
    ((1, 50, 150), (64, 64), (43, 43)),  # the crop is taller than the image: full-height windows
])
def test_slide_matches_naive_loop(model, shape, crop, stride):
    batch, height, width = shape
    pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    got = slide_logits(no_grad_forward(model), pixels, NUM_LABELS, crop=crop, stride=stride)
    expected = _naive_slide(model, pixels, crop, stride)
    assert got.shape == expected.shape == (batch, NUM_LABELS, height, width)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    batched = slide_logits(no_grad_forward(model), pixels, NUM_LABELS, crop=crop, stride=stride, windows_per_call=4)
    torch.testing.assert_close(batched, got, rtol=1e-4, atol=1e-4)


def test_window_grid_follows_mmseg():
    # Cityscapes: 1024 x 2048, crop 1024, stride 768 -> one row of three windows, the last clamped to the border.
    assert window_grid(1024, 2048, (1024, 1024), (768, 768)) == [
        (0, 1024, 0, 1024), (0, 1024, 768, 1792), (0, 1024, 1024, 2048)]
    assert window_grid(50, 60, (64, 64), (32, 32)) == [(0, 50, 0, 60)]
    for height, width in ((100, 100), (129, 257), (64, 65)):
        windows = window_grid(height, width, (64, 64), (48, 48))
        covered = np.zeros((height, width), int)
        for y1, y2, x1, x2 in windows:
            assert (y2 - y1, x2 - x1) == (64, 64) and 0 <= y1 and y2 <= height and 0 <= x1 and x2 <= width
            covered[y1:y2, x1:x2] += 1
        assert covered.min() >= 1


def test_slide_rejects_bad_arguments(model):
    pixels = torch.randn(1, 3, 40, 40)
    with pytest.raises(ValueError, match="stride must not exceed the crop"):
        slide_logits(no_grad_forward(model), pixels, NUM_LABELS, crop=(32, 32), stride=(40, 16))
    with pytest.raises(ValueError, match="crop"):
        slide_logits(no_grad_forward(model), pixels, NUM_LABELS, crop=(0, 32))
    with pytest.raises(ValueError, match="expected num_labels=3"):
        slide_logits(no_grad_forward(model), pixels, 3, crop=32, stride=16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        slide_logits(no_grad_forward(model), torch.randn(3, 40, 40), NUM_LABELS)


def test_slide_pad_to_crop_pads_small_windows_like_the_official_code(model):
    pixels = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(4))
    got = slide_logits(no_grad_forward(model), pixels, NUM_LABELS, crop=(64, 96), stride=(32, 32), pad_to_crop=True)
    expected = upsampled_logits(no_grad_forward(model), F.pad(pixels, (0, 26, 0, 14)))[:, :, :50, :70]
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------- streamed slide labels
SLIDE_CASES = pytest.mark.parametrize("height,width,crop,stride,sizes,pad_to_crop", [
    (150, 230, (96, 128), (64, 80), [(150, 230), (150, 230)], False),
    (150, 230, (96, 128), (64, 80), [(301, 97), (77, 500)], False),
    (70, 90, (96, 128), None, [(70, 90), (140, 45)], True),
    (129, 257, (64, 80), (37, 41), [(129, 257), (200, 300)], False),
    (200, 150, (96, 96), (96, 96), [(200, 150), (200, 97)], False),
], ids=["same-size", "resized", "padded-small", "odd-stride", "stride-is-crop"])


def _full_buffer_labels(model, pixels, sizes, crop, stride, pad_to_crop):
    """argmax of slide_logits, resized to each size (F.interpolate): mmseg's slide mode at full resolution."""
    full = slide_logits(no_grad_forward(model), pixels, NUM_LABELS, crop, stride, pad_to_crop=pad_to_crop)
    return [full[i].argmax(0) if (h, w) == tuple(pixels.shape[2:]) else
            F.interpolate(full[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
            for i, (h, w) in enumerate(sizes)]


@SLIDE_CASES
def test_slide_labels_with_the_fused_pass_equal_the_full_buffer_labels(model, height, width, crop, stride, sizes,
                                                                       pad_to_crop):
    """With the extension's slide_argmax (the engine's label pass on CPU) the streamed labels are exactly argmax of
    slide_logits resized to each size; the progress reports count the windows, starting at 0 before the first."""
    from segformer_fast.ops import extension

    if not extension.slide_argmax_available("cpu"):
        pytest.skip("segformer_fast._C is not built (the fused label pass is the extension's)")
    pixels = torch.randn(len(sizes), 3, height, width, generator=torch.Generator().manual_seed(height))
    calls = []
    got = slide_labels(no_grad_forward(model), pixels, sizes, NUM_LABELS, crop, stride, pad_to_crop=pad_to_crop,
                       label_pass=extension.slide_argmax, progress=lambda done, total: calls.append((done, total)))
    windows = len(window_grid(height, width, *resolve_window(crop, stride)))
    assert calls == [(done, windows) for done in range(windows + 1)]
    for index, expected in enumerate(_full_buffer_labels(model, pixels, sizes, crop, stride, pad_to_crop)):
        assert got[index].shape == sizes[index] and got[index].dtype == torch.int64
        assert torch.equal(got[index], expected), (index, sizes[index])


@SLIDE_CASES
def test_slide_labels_with_the_torch_pass_equal_the_full_buffer_labels(model, height, width, crop, stride, sizes,
                                                                       pad_to_crop):
    """The torch label pass (the default, any device), in chunks of a few rows, equals the full-buffer labels on
    >= 99.9 % of pixels (it interpolates in the separable form: float rounding may flip a near tie)."""
    pixels = torch.randn(len(sizes), 3, height, width, generator=torch.Generator().manual_seed(height))
    got = slide_labels(no_grad_forward(model), pixels, sizes, NUM_LABELS, crop, stride, pad_to_crop=pad_to_crop,
                       label_pass=functools.partial(torch_label_pass, chunk_bytes=50_000))
    for index, expected in enumerate(_full_buffer_labels(model, pixels, sizes, crop, stride, pad_to_crop)):
        assert got[index].shape == sizes[index] and got[index].dtype == torch.int64
        assert (got[index] == expected).float().mean() >= 0.999, (index, sizes[index])


@pytest.mark.parametrize("label_pass", ["engine", "torch"])
def test_slide_labels_memory_follows_the_windows_not_the_image(model, label_pass):
    """Live tensors of the streamed slide stay within the model (estimate_peak_memory_bytes(mode="slide"), with the
    torch pass's chunk or none for the engine's fused CPU pass), and well under what the full-resolution
    accumulator of slide_logits needs."""
    engine = optimize(Segformer.from_config("b0", num_labels=150, seed=2), kernels="torch", verify=False)
    if label_pass == "engine" and engine.label_pass is None:
        pytest.skip("segformer_fast._C is not built (the fused label pass is the extension's)")
    weights = engine_tensors([engine.stages, engine.decoder], [])
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    batch, height, width, crop, stride = 2, 128, 224, 64, 48
    chunk = 0 if label_pass == "engine" else 2**20
    chosen = engine.label_pass if label_pass == "engine" else functools.partial(torch_label_pass, chunk_bytes=chunk)
    pixels = torch.randn(batch, 3, height, width)
    runs = {
        "streamed": lambda: slide_labels(engine.logits, pixels, [(height, width)] * batch, 150, crop, stride,
                                         label_pass=chosen),
        "full": lambda: slide_logits(engine.logits, pixels, 150, crop, stride).argmax(1),
    }
    peaks = {}
    for name, run in runs.items():
        tracker = LiveTensorBytes(exclude=weights + [pixels])
        with torch.no_grad(), tracker:
            result = run()
            del result
        peaks[name] = tracker.peak + weight_bytes + pixels.numel() * pixels.element_size()
    estimate = estimate_peak_memory_bytes("b0", batch, height, width, torch.float32, 150, kernels="torch",
                                          workspace_bytes=0, mode="slide", crop=crop, stride=stride,
                                          chunk_bytes=chunk)
    assert peaks["streamed"] <= estimate <= 1.5 * peaks["streamed"], (peaks, estimate)
    assert peaks["streamed"] < 0.5 * peaks["full"], peaks
    with pytest.raises(ValueError, match="engine only"):
        estimate_peak_memory_bytes("b0", 1, 64, 64, mode="slide", reference=True)
    with pytest.raises(ValueError, match="mode must be"):
        estimate_peak_memory_bytes("b0", 1, 64, 64, mode="tiles")
