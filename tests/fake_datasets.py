"""Small ADE20K and Cityscapes folders written by the tests, with known labels (the eval job's, the CLI's and the
scale-out tests'), and a predictor that returns the known labels."""

import numpy as np
from PIL import Image

from segformer_fast.jobs.metrics import CITYSCAPES_LABEL_TO_TRAIN_ID

# ------------------------------------------------------------------------------------------ generated datasets

# distinct sizes, so that a test predictor can tell the images apart by size alone
SIZES = [(40, 56), (44, 56), (40, 60)]


def ade_raw_label(h, w):
    """Raw ADE20K labels: rows 0-9 -> 1, 10-19 -> 2, 20.. -> 3; a 4x4 'other' (0) block at the top left; a 2x3
    block of 255 at the bottom right."""
    raw = np.full((h, w), 3, dtype=np.uint8)
    raw[:10] = 1
    raw[10:20] = 2
    raw[:4, :4] = 0
    raw[-2:, -3:] = 255
    return raw


def random_rgb(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_ade20k(root, sizes=SIZES, split=True):
    images = root / "images" / ("validation" if split else "")
    annotations = root / "annotations" / ("validation" if split else "")
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    raws = {}
    for i, (h, w) in enumerate(sizes):
        name = f"ADE_val_{i:08d}"
        random_rgb(h, w, i).save(images / f"{name}.jpg", quality=90)
        raw = ade_raw_label(h, w)
        Image.fromarray(raw, "L").save(annotations / f"{name}.png")
        raws[(h, w)] = raw
    return raws


def predict_by_size(truth):
    """A predictor returning the given label map for each image size."""
    return lambda image: truth[(image.height, image.width)].astype(np.int64)


def make_cityscapes(root, sizes=SIZES):
    """Three images in two cities; the last one has only a labelTrainIds file."""
    rng = np.random.default_rng(1)
    inverse = {v: k for k, v in CITYSCAPES_LABEL_TO_TRAIN_ID.items()}
    cities = ["bremen", "bremen", "zurich"]
    truth = {}
    for i, ((h, w), city) in enumerate(zip(sizes, cities)):
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        stem = f"{city}_{i:06d}_000019"
        random_rgb(h, w, i).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        train = rng.integers(0, 19, (h // 4, w // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        train[:3, :] = 255
        if i < 2:
            ids = np.vectorize(lambda t: inverse.get(int(t), 0))(train).astype(np.uint8)  # 255 -> unlabeled (0)
            Image.fromarray(ids, "L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
        else:
            Image.fromarray(train, "L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png")
        truth[(h, w)] = train
    return truth
