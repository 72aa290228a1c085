"""Huge-image inference: sliding windows, engine.segment modes and inputs, the peak-memory model."""

import dataclasses
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from segformer_fast import Segformer, optimize, postprocess, preprocess
from segformer_fast.core.runtime import is_out_of_memory
from segformer_fast.inference.memory import estimate_peak_memory_bytes
from segformer_fast.inference.segment import segment_images
from segformer_fast.inference.slide import slide_labels
from segformer_fast.inference.windows import resolve_window, slide_logits, window_grid

NUM_LABELS = 7


@pytest.fixture(scope="module")
def model():
    return Segformer.from_config("b0", num_labels=NUM_LABELS, seed=11)


@pytest.fixture(scope="module")
def engine(model):
    return optimize(model)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)


def _forward(model):
    def forward(pixel_values):
        with torch.no_grad():
            return model(pixel_values)

    return forward


def _upsampled_logits(forward, pixel_values):
    """mmseg's whole mode written out: one forward, logits upsampled (bilinear) to the input size in float32."""
    logits = forward(pixel_values)
    return F.interpolate(logits.float(), size=pixel_values.shape[2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------- slide_logits
def test_slide_equals_whole_when_one_window_covers_the_image(model, engine):
    pixels = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    for forward in (_forward(model), engine.logits):
        expected = _upsampled_logits(forward, pixels)
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
    got = slide_logits(_forward(model), pixels, NUM_LABELS, crop=crop, stride=stride)
    expected = _naive_slide(model, pixels, crop, stride)
    assert got.shape == expected.shape == (batch, NUM_LABELS, height, width)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    batched = slide_logits(_forward(model), pixels, NUM_LABELS, crop=crop, stride=stride, windows_per_call=4)
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
        slide_logits(_forward(model), pixels, NUM_LABELS, crop=(32, 32), stride=(40, 16))
    with pytest.raises(ValueError, match="crop"):
        slide_logits(_forward(model), pixels, NUM_LABELS, crop=(0, 32))
    with pytest.raises(ValueError, match="expected num_labels=3"):
        slide_logits(_forward(model), pixels, 3, crop=32, stride=16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        slide_logits(_forward(model), torch.randn(3, 40, 40), NUM_LABELS)


# ---------------------------------------------------------------------------------------------- segment
def test_segment_inputs_give_identical_labels(engine, image, tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    for mode, kwargs in (("whole", {"size": (64, 64)}), ("slide", {"size": None, "crop": 64, "stride": 48})):
        results = [engine.segment(item, mode=mode, **kwargs) for item in
                   (image, Image.fromarray(image), str(path), path, np.dstack([image, np.full(image.shape[:2], 9,
                                                                                                 np.uint8)]))]
        for labels in results:
            assert labels.shape == (90, 130) and labels.dtype == torch.int64
            assert torch.equal(labels, results[0]), mode
        both = engine.segment([image, Image.fromarray(image)], mode=mode, **kwargs)
        assert isinstance(both, list) and all(torch.equal(b, results[0]) for b in both)
    gray = image[:, :, 0]
    assert torch.equal(engine.segment(gray, size=(64, 64)), engine.segment(Image.fromarray(gray), size=(64, 64)))


def test_segment_slide_mode_matches_slide_logits(engine, image):
    pixels = preprocess(image, size=(90, 130))
    expected = slide_logits(engine.logits, pixels, NUM_LABELS, crop=(64, 64), stride=(43, 43)).argmax(1)[0]
    got = engine.segment(image, size=None, mode="slide", crop=64)  # stride 2/3 of 64 = 43
    assert got.shape == expected.shape
    assert (got == expected).float().mean() >= 0.999  # streamed: equal up to float rounding of near-ties
    # resized: the slide logits at 96 x 96 go back to the image's size
    small = engine.segment(image, size=(96, 96), mode="slide", crop=(64, 64), stride=(32, 32))
    assert small.shape == (90, 130)


def test_segment_keep_ratio_groups_differently_sized_images(engine, image):
    other = np.ascontiguousarray(image[:, :60])
    labels = engine.segment([image, other], short_side=64)
    assert [tuple(label.shape) for label in labels] == [(90, 130), (90, 60)]
    assert torch.equal(labels[1], engine.segment(other, short_side=64))


@pytest.mark.parametrize("error", [
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate 9 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
])
def test_auto_mode_moves_to_slide_on_out_of_memory(engine, image, monkeypatch, error):
    expected = engine.segment(image, size=None, mode="slide", crop=(64, 64), stride=(48, 48))
    calls = []

    def out_of_memory(pixel_values, sizes):
        calls.append(tuple(pixel_values.shape))
        raise error

    monkeypatch.setattr(engine, "whole_labels", out_of_memory)
    with pytest.warns(RuntimeWarning, match=r"sliding windows with crop 64x64 and stride 48x48"):
        got = engine.segment(image, size=None, mode="auto", crop=(64, 64), stride=(48, 48))
    assert calls == [(1, 3, 90, 130)]
    assert torch.equal(got, expected)


def test_auto_mode_whole_when_it_fits_and_other_errors_propagate(engine, image, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(engine.segment(image, mode="auto", size=(64, 64)), engine.segment(image, size=(64, 64)))

    def broken(pixel_values, sizes):
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(engine, "whole_labels", broken)
    with pytest.raises(RuntimeError, match="something else"):
        engine.segment(image, mode="auto", size=(64, 64))


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 99999999999 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_segment_rejects_bad_inputs(engine, image, tmp_path):
    with pytest.raises(ValueError, match="uint8.*float32"):
        engine.segment(np.zeros((20, 20, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*shape \(20,\)"):
        engine.segment(np.zeros(20, np.uint8))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        engine.segment(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="empty list"):
        engine.segment([])
    with pytest.raises(TypeError, match="PIL image.*got int"):
        engine.segment(5)
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.segment(image, mode="tiles")
    with pytest.raises(ValueError, match="stride must not exceed"):
        engine.segment(image, mode="slide", crop=32, stride=48)


# ---------------------------------------------------------------------------------------------- memory model
def test_memory_estimate_properties():
    base = estimate_peak_memory_bytes("b0", 1, 512, 512, torch.float32)
    assert isinstance(base, int) and base > 0
    assert estimate_peak_memory_bytes("b0", 2, 512, 512, torch.float32) > base
    assert estimate_peak_memory_bytes("b0", 1, 1024, 512, torch.float32) > base
    assert estimate_peak_memory_bytes("b0", 1, 512, 1024, torch.float32) > base
    assert estimate_peak_memory_bytes("b0", 1, 512, 512, torch.float16) < base
    assert estimate_peak_memory_bytes("b0", 1, 512, 512, "bf16") == estimate_peak_memory_bytes(
        "b0", 1, 512, 512, torch.float16)
    assert estimate_peak_memory_bytes("b5", 1, 512, 512, torch.float32) > base
    for variant in ("b0", "b2", "b5"):
        engine = estimate_peak_memory_bytes(variant, 1, 1024, 2048, torch.float16)
        reference = estimate_peak_memory_bytes(variant, 1, 1024, 2048, torch.float16, reference=True)
        assert reference > engine
        assert estimate_peak_memory_bytes(variant, 1, 1024, 2048, torch.float16, engine=False) == reference
    # activations scale ~linearly with batch for the engine, ~quadratically with pixels for the reference scores
    weights_and_ws = estimate_peak_memory_bytes("b0", 1, 8, 8, torch.float32)
    one = estimate_peak_memory_bytes("b0", 1, 1024, 2048, torch.float32) - weights_and_ws
    four = estimate_peak_memory_bytes("b0", 4, 1024, 2048, torch.float32) - weights_and_ws
    assert 3.9 < four / one < 4.1
    reference_small = estimate_peak_memory_bytes("b0", 1, 1024, 1024, torch.float32, reference=True, labels=False)
    reference_large = estimate_peak_memory_bytes("b0", 1, 2048, 2048, torch.float32, reference=True, labels=False)
    assert reference_large > 10 * reference_small
    with pytest.raises(ValueError, match="variant"):
        estimate_peak_memory_bytes("b9", 1, 64, 64)
    with pytest.raises(ValueError, match="batch"):
        estimate_peak_memory_bytes("b0", 0, 64, 64)
    for bad_dtype in ("fp8", torch.int8):
        with pytest.raises(ValueError, match="dtype must be"):
            estimate_peak_memory_bytes("b0", 1, 64, 64, bad_dtype)


def test_memory_estimate_known_value():
    # b0, fp32, 1 x 3 x 512 x 512, torch kernels, no workspace: weights (3,489,270 engine parameters) + input +
    # the stage-2 Mix-FFN peak: the stage-1 decoder projection (N1 D) and output tokens (N1 C1) + 15 N2 C2
    # (N1 = 128 * 128, C1 = 32, N2 = 64 * 64, C2 = 64, D = 256); it beats stage 1's 15 N1 C1.
    expected = 3_489_270 * 4 + 3 * 512 * 512 * 4 + (128 * 128 * (256 + 32) + 15 * 64 * 64 * 64) * 4
    assert estimate_peak_memory_bytes("b0", 1, 512, 512, torch.float32, kernels="torch", workspace_bytes=0) == expected
    # reference attention, stage 1: scores 8 bytes x 1 head x N x Nkv (Nkv = 16 * 16) are part of the peak
    with_scores = estimate_peak_memory_bytes("b0", 1, 512, 512, torch.float32, reference=True, labels=False)
    assert with_scores > 8 * 128 * 128 * 256


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still referenced: a CPU stand-in for
    torch.cuda.max_memory_allocated (storages in ``exclude``, the weights and the input, are not counted)."""

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs, self.sizes, self.current, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if not storage.nbytes() or storage.data_ptr() in self.exclude:
                continue
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def _engine_tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            _engine_tensors(getattr(obj, field.name), out)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _engine_tensors(item, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_estimate_matches_live_tensors_on_cpu(dtype):
    """measured <= estimate <= 1.5 x measured for the engine's torch path and the reference, counting live
    tensors on CPU (no allocator statistics there; the workspace allowance is for CUDA libraries)."""
    from segformer_fast.ops import extension as ops

    model = Segformer.from_config("b0", num_labels=150, seed=2).to(dtype)
    engine = optimize(model, kernels="torch", verify=False)
    engine_weights = _engine_tensors([engine.stages, engine.decoder], [])
    model_weights = list(model.parameters()) + list(model.buffers())
    for batch, height, width in ((1, 160, 192), (2, 96, 200)):
        pixels = torch.randn(batch, 3, height, width).to(dtype)
        runs = {
            # the lambdas run within this iteration, so reading the loop variables late is intended
            "engine": (lambda: ops.upsample_argmax(engine.logits(pixels), height, width), engine_weights, {}),  # noqa: B023
            "reference": (lambda: F.interpolate(model(pixels), size=(height, width), mode="bilinear").argmax(1),  # noqa: B023
                          model_weights, {"reference": True}),
        }
        for name, (run, weights, options) in runs.items():
            tracker = _LiveTensorBytes(exclude=weights + [pixels])
            with torch.no_grad(), tracker:
                del_me = run()
                del del_me
            measured = tracker.peak + sum(t.numel() * t.element_size() for t in weights + [pixels])
            estimate = estimate_peak_memory_bytes("b0", batch, height, width, dtype, 150, kernels="torch",
                                                  workspace_bytes=0, **options)
            assert measured <= estimate <= 1.5 * measured, (name, batch, height, width, measured, estimate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.max_memory_allocated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_memory_estimate_reports_cuda_peak(variant, dtype):
    from segformer_fast.ops import extension as ops

    device = torch.device("cuda")
    batch, height, width = 2, 512, 1024
    engine = optimize(Segformer.from_config(variant, num_labels=150, seed=0).to(device), dtype=dtype,
                      cuda_graphs=False)
    pixels = torch.randn(batch, 3, height, width, device=device, dtype=dtype)
    ops.upsample_argmax(engine.logits(pixels), height, width)  # warm-up: kernels compiled, workspaces allocated
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ops.upsample_argmax(engine.logits(pixels), height, width)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()  # engine weights + input + activations (the model is gone)
    estimate = estimate_peak_memory_bytes(variant, batch, height, width, dtype, 150)
    # report-only until calibrated on a GPU: cuBLAS / cuDNN workspaces count toward the peak, and the estimate's
    # 32 MiB workspace allowance has never been compared with a measurement (the CPU variant above asserts bounds)
    print(f"\nmemory model {variant} {dtype} {batch}x{height}x{width}: estimate {estimate / 2**20:.1f} MiB, "
          f"measured {measured / 2**20:.1f} MiB, ratio {estimate / measured:.3f}")
    assert measured > 0 and estimate > 0


def test_slide_pad_to_crop_pads_small_windows_like_the_official_code(model):
    pixels = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(4))
    got = slide_logits(_forward(model), pixels, NUM_LABELS, crop=(64, 96), stride=(32, 32), pad_to_crop=True)
    expected = _upsampled_logits(_forward(model), F.pad(pixels, (0, 26, 0, 14)))[:, :, :50, :70]
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------- streamed slide labels
@pytest.mark.parametrize("height,width,crop,stride,sizes,pad_to_crop", [
    (150, 230, (96, 128), (64, 80), [(150, 230), (150, 230)], False),
    (150, 230, (96, 128), (64, 80), [(301, 97), (77, 500)], False),
    (70, 90, (96, 128), None, [(70, 90), (140, 45)], True),
    (129, 257, (64, 64), (37, 41), [(129, 257), (200, 300)], False),
], ids=["same-size", "resized", "padded-small", "odd-stride"])
def test_slide_labels_equal_the_full_buffer_labels(model, height, width, crop, stride, sizes, pad_to_crop):
    """The streamed labels equal argmax of slide_logits (resized to each size) on >= 99.9 % of pixels."""
    from segformer_fast.ops import extension as ops

    pixels = torch.randn(len(sizes), 3, height, width, generator=torch.Generator().manual_seed(height))
    full = slide_logits(_forward(model), pixels, NUM_LABELS, crop, stride, pad_to_crop=pad_to_crop)
    calls = []
    got = slide_labels(_forward(model), pixels, sizes, NUM_LABELS, crop, stride, pad_to_crop=pad_to_crop,
                       chunk_bytes=50_000, progress=lambda done, total: calls.append((done, total)))
    windows = len(window_grid(height, width, *resolve_window(crop, stride)))
    # progress counts windows and label bands, so it moves through the label passes too: steps of one, each
    # report with the same total, more steps than windows, ending at the total
    total = calls[-1][1]
    assert [done for done, _ in calls] == list(range(1, total + 1)) and {t for _, t in calls} == {total}
    assert total > windows
    for index, (h, w) in enumerate(sizes):
        expected = full[index].argmax(0) if (h, w) == (height, width) else \
            ops.upsample_argmax_eager(full[index:index + 1], h, w)[0]
        assert got[index].shape == (h, w) and got[index].dtype == torch.int64
        assert (got[index] == expected).float().mean() >= 0.999, (index, h, w)


def test_slide_labels_memory_follows_the_windows_not_the_image(model):
    """Live tensors of the streamed slide stay within the model (estimate_peak_memory_bytes(mode="slide")),
    and well under what the full-resolution accumulator of slide_logits needs."""
    engine = optimize(Segformer.from_config("b0", num_labels=150, seed=2), kernels="torch", verify=False)
    weights = _engine_tensors([engine.stages, engine.decoder], [])
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    batch, height, width, crop, stride, chunk = 2, 128, 224, 64, 48, 2**20
    pixels = torch.randn(batch, 3, height, width)
    runs = {
        "streamed": lambda: slide_labels(engine.logits, pixels, [(height, width)] * batch, 150, crop, stride,
                                         chunk_bytes=chunk),
        "full": lambda: slide_logits(engine.logits, pixels, 150, crop, stride).argmax(1),
    }
    peaks = {}
    for name, run in runs.items():
        tracker = _LiveTensorBytes(exclude=weights + [pixels])
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


def test_auto_mode_reports_the_mode_and_size_it_chose(engine, image):
    choices = []
    common = dict(num_labels=NUM_LABELS, mode="auto", crop=(64, 64), on_auto_choice=lambda *c: choices.append(c))
    segment_images(image, engine.logits, size=(64, 96), whole_labels=engine.whole_labels, **common)
    assert choices == [("whole", (64, 96))]

    def out_of_memory(pixel_values, sizes):
        raise MemoryError()

    with pytest.warns(RuntimeWarning, match="sliding windows"):
        segment_images([image, image], engine.logits, size=None, whole_labels=out_of_memory, **common)
    assert choices[1:] == [("slide", (90, 130))]  # one report per group of same-size images
