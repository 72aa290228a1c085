"""Fixtures of the command-line tests: a saved random B0 checkpoint and a folder of images (one of them corrupt)."""

import numpy as np
import pytest
from PIL import Image

from segformer_fast import Segformer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=5).save_pretrained(folder)
    return folder


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (41, 37), dtype=np.uint8)).save(root / "nested" / "b.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root
