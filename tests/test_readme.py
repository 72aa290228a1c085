"""The README's code works as written (with a local checkpoint in place of the hub id: tests never download)."""

import re
from pathlib import Path

import pytest
import torch

from segformer_fast import Segformer

from helpers import assert_relative_close

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "nvidia/segformer-b0-finetuned-ade-512-512"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_drop_in_snippet_runs_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    Segformer.from_config("b0", num_labels=150, seed=3).save_pretrained(tmp_path / "ckpt")
    code = _python_block_after("### Drop-in for transformers")
    assert HUB_ID in code
    pixel_values = torch.randn(1, 3, 96, 128)
    namespace = {"pixel_values": pixel_values}
    exec(code.replace(HUB_ID, str(tmp_path / "ckpt")), namespace)
    original = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        expected = original(pixel_values=pixel_values).logits
    assert_relative_close(namespace["logits"], expected, 1e-5, "README drop-in snippet")


def test_usage_snippet_runs(tmp_path):
    from PIL import Image

    Segformer.from_config("b0", num_labels=150, seed=3).save_pretrained(tmp_path / "ckpt")
    Image.new("RGB", (80, 60), (120, 30, 200)).save(tmp_path / "room.jpg")
    code = _python_block_after("## Usage").replace(HUB_ID, str(tmp_path / "ckpt"))
    code = code.replace('"room.jpg"', repr(str(tmp_path / "room.jpg")))
    namespace = {}
    exec(code, namespace)
    assert namespace["labels"].shape == (60, 80)
