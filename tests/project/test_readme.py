"""The README's code runs as written: every ```python block, and the command-line examples.

Nothing is downloaded: the hub id the README uses is served from a private huggingface_hub cache that the test fills
with a random-weight checkpoint (HF_HUB_OFFLINE=1 is set for the whole test run), and the snippets run in a
temporary folder holding the files they name (a real JPEG ``room.jpg``, a few photos, a tiny ADE20K folder).
"""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.cli import main

from helpers import ROOT, assert_relative_close

README = ROOT / "README.md"
HUB_ID = "nvidia/segformer-b0-finetuned-ade-512-512"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOM_SIZE = (60, 80)  # (H, W) of room.jpg


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def section(text: str, heading: str) -> str:
    """The text of a README section, from its heading to the next heading of the same or a higher level."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    following = re.compile(r"^#{1,%d} " % len(level), re.M)
    match = following.search(text, start + len(heading) + 1)
    return text[start:match.start() if match else len(text)]


def _photo(path: Path, height: int, width: int, seed: int) -> None:
    """A real photo-like JPEG: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * y / height, 255 * x / width, 128 + 0 * x], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture()
def readme_folder(tmp_path, monkeypatch):
    """cwd: a folder with room.jpg, photos/, a.jpg, big/ and ADEChallengeData2016/; the README's hub id in a private
    huggingface_hub cache (a random B0 with 150 classes). Returns that model."""
    import huggingface_hub.constants

    source = Segformer.from_config("b0", num_labels=150, seed=3)
    cache = tmp_path / "hf-cache"
    storage = cache / ("models--" + HUB_ID.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    source.save_pretrained(storage / "snapshots" / COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _photo(work / "room.jpg", *ROOM_SIZE, seed=0)
    _photo(work / "photos" / "kitchen.jpg", 48, 64, seed=1)
    _photo(work / "photos" / "garden" / "pond.png", 40, 40, seed=2)
    _photo(work / "a.jpg", 30, 50, seed=3)
    _photo(work / "big" / "street.png", 70, 90, seed=4)
    _photo(work / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg", 32, 48, seed=5)
    annotation = np.random.default_rng(6).integers(0, 151, (32, 48), dtype=np.uint8)
    (work / "ADEChallengeData2016" / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(annotation, "L").save(work / "ADEChallengeData2016" / "annotations" / "validation" /
                                          "ADE_val_00000001.png")
    return source


def test_every_python_snippet_runs_as_written(readme_folder):
    pytest.importorskip("transformers")
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    for index, code in enumerate(blocks):
        namespace = {}
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python block {index + 1} raised {type(error).__name__}: {error}\n{code}")
        if "labels" in namespace:
            assert tuple(namespace["labels"].shape) == ROOM_SIZE, f"block {index + 1}"


def test_usage_snippet_segments_with_the_hub_model(readme_folder):
    namespace = {}
    exec(python_blocks(section(README.read_text(), "## Usage"))[0], namespace)
    assert namespace["logits"].shape == (1, 150, 128, 128)
    assert not namespace["logits"].requires_grad, "the reference example runs without autograd"
    with torch.no_grad():
        expected = readme_folder(namespace["pixel_values"])
    assert_relative_close(namespace["logits"], expected, 1e-6, "README usage snippet: the hub id's model")
    assert tuple(namespace["labels"].shape) == ROOM_SIZE


def test_offline_checkpoint_snippet_writes_a_loadable_checkpoint(readme_folder):
    code = python_blocks(section(README.read_text(), "### A checkpoint without network"))[0]
    exec(code, {})
    model = Segformer.from_pretrained("ckpt/")
    expected = Segformer.from_config("b0", num_labels=150, seed=0)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_drop_in_snippet_runs_and_matches_transformers(readme_folder):
    transformers = pytest.importorskip("transformers")
    code = python_blocks(section(README.read_text(), "### Drop-in for transformers"))[0]
    assert HUB_ID in code
    namespace = {}
    exec(code, namespace)
    original = transformers.SegformerForSemanticSegmentation.from_pretrained(HUB_ID).eval()
    with torch.no_grad():
        expected = original(pixel_values=namespace["pixel_values"]).logits
    assert_relative_close(namespace["logits"], expected, 1e-5, "README drop-in snippet")


def test_command_line_examples_run(readme_folder, capsys):
    text = section(README.read_text(), "### Command line")
    block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert all(command[0] == "segformer-fast" for command in commands)
    Segformer.from_config("b0", num_labels=150, seed=7).save_pretrained("ckpt")  # the examples' ckpt/
    ran = []
    for command in commands:
        if command[1] == "bench":  # a benchmark run takes minutes; tests/benchmarks/ cover the command
            continue
        code = main(command[1:] + (["--quiet"] if command[1] in ("segment", "eval") else []))
        captured = capsys.readouterr()
        assert code == 0, f"{' '.join(command)} exited {code}: {captured.err}"
        ran.append(command[1])
    assert sorted(set(ran)) == ["eval", "info", "init", "segment"]
    for path in ("labels/kitchen_labels.png", "labels/garden/pond_overlay.png", "out/a_labels.png",
                 "out/street_labels.png", "random-b0/model.safetensors", "r.json"):
        assert Path(path).is_file(), path
    assert np.asarray(Image.open("out/street_labels.png")).shape == (70, 90)


def test_label_png_formats_are_documented():
    text = " ".join(section(README.read_text(), "### Command line").split())
    assert "palette image" in text and "16-bit grayscale PNG" in text and "more than 256 classes" in text


def test_layout_names_every_room_and_every_benchmark_file():
    """The README's layout stays the tree's: every room of the package and every file of benchmarks/ is named."""
    layout = README.read_text(encoding="utf-8").split("## Layout", 1)[1]
    rooms = [f"{path.name}/" for path in (ROOT / "segformer_fast").iterdir()
             if (path / "__init__.py").exists() or path.is_symlink()]
    benchmark_files = [path.name + ("/" if path.is_dir() else "") for path in (ROOT / "benchmarks").iterdir()
                       if path.name not in ("README.md", "__pycache__")]
    missing = [name for name in rooms + benchmark_files if name not in layout]
    assert len(rooms) >= 12 and "bench_model.py" in benchmark_files
    assert not missing, f"the README's layout does not name {missing}"
