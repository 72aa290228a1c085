"""segment_images / engine.segment: every input kind, whole / slide / auto modes, keep-ratio resizing, the move to
sliding windows on out-of-memory, bad inputs."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import preprocess
from segformer_fast.core.runtime import is_out_of_memory
from segformer_fast.inference.segment import segment_images
from segformer_fast.inference.slide import slide_logits

from inference_models import NUM_LABELS


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
