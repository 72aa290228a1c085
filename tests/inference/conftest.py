"""Fixtures of the inference tests: a random B0 of NUM_LABELS classes, its engine, and a random RGB image."""

import numpy as np
import pytest

from segformer_fast import Segformer, optimize

from inference_models import NUM_LABELS


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
