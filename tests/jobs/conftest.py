"""Fixtures of the job tests: a Ray session of this module's own, a random B0 checkpoint, a folder of mixed images
and its single-process output, and a small ADE20K folder."""

import pytest

from segformer_fast import Segformer
from segformer_fast.cli import main

from fake_datasets import make_ade20k
from scaleout_support import SIZE, write_images


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason='ray is not installed (pip install "ray[data]")')
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=11).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """18 readable images, one truncated PNG and one text file named like an image: 20 inputs."""
    root = tmp_path_factory.mktemp("mixed") / "images"
    write_images(root, 18, seed=3)
    good = (root / "img0.jpg").read_bytes()
    (root / "nested" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.png").write_text("not an image at all\n")
    return root


@pytest.fixture(scope="module")
def single_process_output(checkpoint, mixed_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    code = main(["segment", str(mixed_folder), "--model", str(checkpoint), "--out", str(out), *SIZE, "--quiet"])
    assert code == 1, "the broken inputs must make the single-process exit code 1"
    return out


@pytest.fixture(scope="module")
def ade_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    make_ade20k(root, sizes=[(40, 56), (44, 56), (40, 60), (52, 48), (36, 64)])
    return root
