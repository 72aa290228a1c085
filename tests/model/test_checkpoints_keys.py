"""Checkpoint keys that do not fit the model: missing, unexpected and mis-shaped keys (listed, with shapes), a class
count that disagrees with the weights, and non-finite weights (named).
"""

import json
import re

import pytest
import torch

from segformer_fast.model import key_families
from segformer_fast.model.segformer import Segformer

from checkpoint_files import hub_state_dict, write_checkpoint, write_hub_folder

transformers = pytest.importorskip("transformers", reason="transformers is the independent implementation")


def _problem_sections(message: str) -> dict:
    """{'missing': [...], 'unexpected': [...], 'mis-shaped': [...]} parsed from a from_family error message."""
    sections = {}
    for part in message.split(" | "):
        match = re.search(r"(missing|unexpected|mis-shaped) keys \((\d+)\): (.*)$", part)
        if match:
            kind, count, listing = match.groups()
            separator = "; " if kind == "mis-shaped" else ", "
            items = listing.split(separator)
            assert len(items) == int(count), part
            sections[kind] = items
    return sections


MISSING_KEYS = {
    "hub": ["segformer.encoder.block.1.0.mlp.dense1.bias", "decode_head.linear_fuse.weight",
            "decode_head.classifier.weight", "segformer.encoder.layer_norm.3.bias"],
    "official": ["backbone.block2.1.attn.kv.weight", "decode_head.linear_c4.proj.bias",
                 "decode_head.linear_pred.weight"],
}


@pytest.mark.parametrize(
    "family,key", [(f, k) for f, keys in MISSING_KEYS.items() for k in keys], ids=lambda v: str(v)
)
def test_one_missing_key(tmp_path, family, key):
    state = key_families.to_family(Segformer.from_config("b0", num_labels=4, seed=3).state_dict(), family)
    del state[key]
    path = write_checkpoint(tmp_path / "w.pth", state)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {"missing": [key]}, str(info.value)


def test_one_unexpected_key(tmp_path):
    state = hub_state_dict(Segformer.from_config("b0", num_labels=4, seed=3))
    state["segformer.encoder.block.0.0.attention.self.extra.weight"] = torch.zeros(3)
    path = write_checkpoint(tmp_path / "w.safetensors", state)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {
        "unexpected": ["segformer.encoder.block.0.0.attention.self.extra.weight"]
    }, str(info.value)


@pytest.mark.parametrize(
    "family,key,shape,expected",
    [
        ("hub", "segformer.encoder.block.2.1.mlp.dense1.weight", (640, 161), (640, 160)),
        ("official", "backbone.block3.0.attn.kv.weight", (319, 160), (320, 160)),
        ("transformers5", "decode_head.linear_projections.1.proj.weight", (256, 63), (256, 64)),
    ],
)
def test_one_misshaped_key(tmp_path, family, key, shape, expected):
    state = key_families.to_family(Segformer.from_config("b0", num_labels=4, seed=3).state_dict(), family)
    state[key] = torch.zeros(shape)
    path = write_checkpoint(tmp_path / "w.pth", state, wrapped=True)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {
        "mis-shaped": [f"{key}: checkpoint {shape}, expected {expected}"]
    }, str(info.value)


def test_missing_unexpected_and_misshaped_together(tmp_path):
    state = hub_state_dict(Segformer.from_config("b0", num_labels=4, seed=3))
    del state["segformer.encoder.block.0.1.layer_norm_2.weight"]
    state["decode_head.extra.bias"] = torch.zeros(2)
    state["decode_head.linear_fuse.weight"] = torch.zeros(256, 1024, 1, 2)
    path = write_checkpoint(tmp_path / "w.bin", state)
    with pytest.raises(ValueError) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {
        "missing": ["segformer.encoder.block.0.1.layer_norm_2.weight"],
        "unexpected": ["decode_head.extra.bias"],
        "mis-shaped": ["decode_head.linear_fuse.weight: checkpoint (256, 1024, 1, 2), expected (256, 1024, 1, 1)"],
    }, str(info.value)


def test_config_num_labels_disagreeing_with_weights(tmp_path):
    source = Segformer.from_config("b0", num_labels=4, seed=3)
    folder = write_hub_folder(tmp_path / "m", source)
    config = json.loads((folder / "config.json").read_text())
    config["num_labels"], config["id2label"], config["label2id"] = 7, {}, {}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors.*decode_head\.classifier\.weight: checkpoint \(4,"):
        Segformer.from_pretrained(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("family,key", [
    ("hub", "segformer.encoder.block.3.1.attention.output.dense.weight"),
    ("official", "backbone.block1.0.attn.kv.bias"),
    ("hub", "decode_head.batch_norm.running_var"),
])
def test_non_finite_weight(tmp_path, family, key, bad):
    state = key_families.to_family(Segformer.from_config("b0", num_labels=4, seed=3).state_dict(), family)
    state[key] = state[key].clone()
    state[key].view(-1)[-1] = bad
    path = write_checkpoint(tmp_path / "w.safetensors", state)
    with pytest.raises(ValueError) as info:
        Segformer.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "NaN or Inf" in message and key in message, message
