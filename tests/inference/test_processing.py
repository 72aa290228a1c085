"""Pre/post-processing (segformer_fast.inference.processing) against transformers' SegformerImageProcessor,
keep-ratio sizes, bad inputs and EXIF orientation."""

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segformer_fast.inference.processing import IMAGENET_MEAN, IMAGENET_STD, output_size, postprocess, preprocess

transformers = pytest.importorskip("transformers")


def _hf_processor(**kwargs):
    """transformers' PIL-backend processor: the one ``SegformerImageProcessor`` falls back to without torchvision.

    The torchvision backend (the default when torchvision is installed) resizes uint8 tensors with torch's
    antialiased bilinear, which differs from PIL by one grey level on some pixels; we match the PIL backend.
    """
    cls = getattr(transformers, "SegformerImageProcessorPil", None) or transformers.SegformerImageProcessor
    return cls(**kwargs)


def _random_image(rng, height, width):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _normalize_reference(resized_uint8):
    """(H, W, 3) uint8 -> (3, H, W) float64 normalized with the ImageNet statistics, independently of the package."""
    x = resized_uint8.astype(np.float64) / 255.0
    x = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


# ---------------------------------------------------------------------------------------------------------------
# preprocess, fixed-size mode, against transformers


@pytest.mark.parametrize("as_pil", [False, True])
def test_preprocess_matches_transformers(as_pil):
    rng = np.random.default_rng(1234 + as_pil)
    processor = _hf_processor()
    for _ in range(4):
        height, width = (int(v) for v in rng.integers(7, 900, size=2))
        array = _random_image(rng, height, width)
        image = Image.fromarray(array) if as_pil else array
        expected = processor(image, return_tensors="pt")["pixel_values"]
        got = preprocess(image)
        assert got.shape == expected.shape == (1, 3, 512, 512)
        assert got.dtype == torch.float32
        error = (got - expected).abs().max().item()
        assert error <= 1e-5, f"{height}x{width}: max abs error {error}"


def test_preprocess_matches_transformers_batch_and_custom_size():
    rng = np.random.default_rng(7)
    images = [_random_image(rng, 333, 517), _random_image(rng, 64, 31), _random_image(rng, 129, 129)]
    processor = _hf_processor(size={"height": 97, "width": 161})
    expected = processor(images, return_tensors="pt")["pixel_values"]
    got = preprocess(images, size=(97, 161))
    assert got.shape == expected.shape == (3, 3, 97, 161)
    assert (got - expected).abs().max().item() <= 1e-5


def test_preprocess_grayscale_array_is_replicated_rgb():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(45, 71), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    expected = _hf_processor()(rgb, return_tensors="pt")["pixel_values"]
    assert (preprocess(gray) - expected).abs().max().item() <= 1e-5
    assert torch.equal(preprocess(gray[:, :, None]), preprocess(gray))


def test_preprocess_path_pil_modes_dtype_and_sizes(tmp_path):
    rng = np.random.default_rng(11)
    array = _random_image(rng, 50, 80)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    from_array = preprocess(array, size=64)
    assert torch.equal(preprocess(path, size=64), from_array)
    assert torch.equal(preprocess(str(path), size=64), from_array)
    # An RGBA PIL image is converted to RGB by dropping alpha.
    rgba = Image.fromarray(np.dstack([array, rng.integers(0, 256, size=(50, 80), dtype=np.uint8)]), "RGBA")
    assert torch.equal(preprocess(rgba, size=64), from_array)
    half = preprocess(array, size=64, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, from_array.half())
    values, sizes = preprocess([array, path], size=64, return_sizes=True)
    assert sizes == [(50, 80), (50, 80)] and values.shape == (2, 3, 64, 64)


def test_preprocess_custom_mean_std():
    rng = np.random.default_rng(5)
    array = _random_image(rng, 20, 30)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = preprocess(array, size=(20, 30), mean=mean, std=std)
    x = array.astype(np.float64) / 255.0
    expected = torch.from_numpy(((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1).copy())
    assert (got[0].double() - expected).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# keep-ratio mode (mmseg Resize(keep_ratio=True) + the official AlignedResize)


@pytest.mark.parametrize(
    "hw, short_side, max_long_side, expected",
    [
        # 683 x 1024 (H x W), ADE config img_scale=(2048, 512):
        # scale = min(2048 / 1024, 512 / 683) = 512 / 683 = 0.74963...
        # h' = int(683 * 0.74963 + 0.5) = 512, w' = int(1024 * 0.74963 + 0.5) = int(768.13) = 768
        # align to 32: 512 -> 512, 768 -> 768
        ((683, 1024), 512, 2048, (512, 768)),
        # 375 x 500: scale = min(2048 / 500, 512 / 375) = 1.36533...
        # h' = int(512.0 + 0.5) = 512, w' = int(682.67 + 0.5) = 683; align: 683 -> ceil(683 / 32) * 32 = 704
        ((375, 500), 512, 2048, (512, 704)),
        # Cityscapes 1024 x 2048 with img_scale=(2048, 1024): scale = min(1, 1) = 1 -> (1024, 2048), already aligned
        ((1024, 2048), 1024, 2048, (1024, 2048)),
        # 300 x 1500 (a panorama): the long side binds: scale = min(2048 / 1500, 512 / 300) = 1.36533...
        # h' = int(409.6 + 0.5) = 410 -> 416, w' = int(2048.0 + 0.5) = 2048 -> 2048
        ((300, 1500), 512, 2048, (416, 2048)),
        # No long-side limit: scale = 512 / 300 = 1.70667; h' = 512, w' = int(2560.0 + 0.5) = 2560 (a multiple of 32)
        ((300, 1500), 512, None, (512, 2560)),
        # 481 x 321 (portrait, odd): scale = min(2048 / 481, 512 / 321) = 1.59502...
        # h' = int(767.21 + 0.5) = 767 -> 768, w' = int(512.0 + 0.5) = 512 -> 512
        ((481, 321), 512, 2048, (768, 512)),
        # Cityscapes real-time B0 row, short side 768: 1024 x 2048 -> scale 0.75 -> (768, 1536)
        ((1024, 2048), 768, 2048, (768, 1536)),
    ],
)
def test_keep_ratio_sizes(hw, short_side, max_long_side, expected):
    assert output_size(*hw, short_side=short_side, max_long_side=max_long_side) == expected


def test_keep_ratio_size_divisor_options():
    # 375 x 500, short side 512: (512, 683) before alignment.
    assert output_size(375, 500, short_side=512, size_divisor=None) == (512, 683)
    assert output_size(375, 500, short_side=512, size_divisor=1) == (512, 683)
    assert output_size(375, 500, short_side=512, size_divisor=64) == (512, 704)
    # Fixed-size mode ignores size_divisor (transformers does not align).
    assert output_size(375, 500, size=(100, 150)) == (100, 150)
    assert output_size(375, 500, size=77) == (77, 77)


@pytest.mark.parametrize("hw", [(683, 1024), (375, 500), (97, 33)])
def test_keep_ratio_values_are_a_direct_pil_resize(hw):
    rng = np.random.default_rng(hw[0])
    array = _random_image(rng, *hw)
    got, sizes = preprocess(array, short_side=512, max_long_side=2048, return_sizes=True)
    target_h, target_w = output_size(*hw, short_side=512, max_long_side=2048)
    assert sizes == [hw] and got.shape == (1, 3, target_h, target_w)
    resized = np.asarray(Image.fromarray(array).resize((target_w, target_h), Image.BILINEAR))
    assert (got[0].double() - _normalize_reference(resized)).abs().max().item() <= 1e-5


def test_keep_ratio_batch_of_different_sizes_is_refused():
    rng = np.random.default_rng(0)
    # 684 x 1024 -> (512, int(766.5 + 0.5) = 767) -> (512, 768), like 683 x 1024.
    same = [_random_image(rng, 683, 1024), _random_image(rng, 684, 1024)]
    assert preprocess(same, short_side=512, max_long_side=2048).shape == (2, 3, 512, 768)
    # 682 x 1024 -> (512, int(768.75 + 0.5) = 769) -> (512, 800): one pixel of height changes the batch shape.
    with pytest.raises(ValueError, match=r"image 0: 683x1024 -> 512x768, image 1: 682x1024 -> 512x800"):
        preprocess([same[0], _random_image(rng, 682, 1024)], short_side=512, max_long_side=2048)


# ---------------------------------------------------------------------------------------------------------------
# postprocess against transformers' post_process_semantic_segmentation


def test_postprocess_matches_transformers():
    processor = _hf_processor()
    generator = torch.Generator().manual_seed(0)
    for trial in range(6):
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        classes = int(torch.randint(2, 40, (1,), generator=generator))
        h, w = (int(v) for v in torch.randint(3, 40, (2,), generator=generator))
        logits = torch.randn(batch, classes, h, w, generator=generator, dtype=torch.float64)
        targets = [tuple(int(v) for v in torch.randint(1, 300, (2,), generator=generator)) for _ in range(batch)]
        if trial % 2:
            targets = [targets[0]] * batch
        expected = processor.post_process_semantic_segmentation(types.SimpleNamespace(logits=logits), targets)
        got = postprocess(logits, targets)
        if len(set(targets)) == 1:
            assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.shape == (batch, *targets[0])
        else:
            assert isinstance(got, list) and len(got) == batch
        for i in range(batch):
            assert got[i].shape == expected[i].shape == targets[i]
            assert torch.equal(got[i], expected[i]), f"trial {trial}, image {i}: labels differ"


def test_postprocess_single_size_and_none():
    logits = torch.randn(2, 5, 8, 12, dtype=torch.float64)
    labels = postprocess(logits, (32, 48))
    assert labels.shape == (2, 32, 48)
    upsampled = F.interpolate(logits, size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.equal(labels, upsampled.argmax(dim=1))
    assert torch.equal(postprocess(logits), logits.argmax(dim=1))
    assert torch.equal(postprocess(logits, torch.tensor([[32, 48], [32, 48]])), labels)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def test_preprocess_bad_inputs():
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"expected at least one image, got an empty list"):
        preprocess([])
    with pytest.raises(ValueError, match=r"image 0: expected an \(H, W, 3\).*got shape \(8, 8, 4\)"):
        preprocess(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\).*got shape \(2, 8, 8, 3\)"):
        preprocess([good, np.zeros((2, 8, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"image 0: expected a uint8 array, got dtype float32"):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"empty image of shape \(0, 8, 3\)"):
        preprocess(np.zeros((0, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"image 0: expected a PIL image, a uint8 numpy array or a path, got Tensor"):
        preprocess(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"size height must be a positive integer, got 0"):
        preprocess(good, size=(0, 8))
    with pytest.raises(ValueError, match=r"size must be an int or a \(height, width\) pair, got \(8, 8, 8\)"):
        preprocess(good, size=(8, 8, 8))
    with pytest.raises(ValueError, match=r"short_side must be a positive integer, got -1"):
        preprocess(good, short_side=-1)
    with pytest.raises(ValueError, match=r"max_long_side must be >= short_side, got 256 < 512"):
        preprocess(good, short_side=512, max_long_side=256)
    with pytest.raises(ValueError, match=r"pass short_side as well"):
        preprocess(good, max_long_side=2048)
    with pytest.raises(ValueError, match=r"mean and std must have 3 values"):
        preprocess(good, mean=(0.5,))
    with pytest.raises(ValueError, match=r"dtype must be a floating-point"):
        preprocess(good, dtype=torch.int32)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        preprocess("/nonexistent/missing.png")


def test_postprocess_bad_inputs():
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K, h, w\), got 3 dimensions \(3, 4, 4\)"):
        postprocess(logits[0], (8, 8))
    with pytest.raises(ValueError, match=r"expected 2 target sizes \(one per image of the batch\), got 3"):
        postprocess(logits, [(8, 8), (8, 8), (8, 8)])
    with pytest.raises(ValueError, match=r"target size 1 height must be a positive integer, got 0"):
        postprocess(logits, [(8, 8), (0, 8)])
    with pytest.raises(ValueError, match=r"target size 0 must be an \(H, W\) pair, got 8"):
        postprocess(logits, [8, (8, 8)])
    with pytest.raises(ValueError, match=r"logits must be floating point, got torch.int64"):
        postprocess(torch.zeros(1, 3, 4, 4, dtype=torch.int64), (8, 8))
    with pytest.raises(ValueError, match=r"must not be empty"):
        postprocess(torch.zeros(1, 0, 4, 4), (8, 8))
    with pytest.raises(TypeError, match=r"logits must be a torch.Tensor, got ndarray"):
        postprocess(np.zeros((1, 3, 4, 4)), (8, 8))


def test_exif_rotated_photo_is_taken_upright_whether_passed_as_path_or_pil_image(tmp_path):
    """One rule for every input kind: the orientation a viewer shows (transformers' load_image does the same)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as opened:
        decoded = np.asarray(opened.convert("RGB"))  # the stored orientation, 12 x 20
        from_pil, pil_sizes = preprocess(opened, size=(16, 16), return_sizes=True)
    from_path, path_sizes = preprocess(str(path), size=(16, 16), return_sizes=True)
    upright = np.ascontiguousarray(np.rot90(decoded, k=-1))  # turned clockwise by hand: 20 x 12
    from_array, array_sizes = preprocess(upright, size=(16, 16), return_sizes=True)
    assert decoded.shape == (12, 20, 3)
    assert pil_sizes == path_sizes == array_sizes == [(20, 12)]
    assert torch.equal(from_pil, from_path) and torch.equal(from_pil, from_array)
