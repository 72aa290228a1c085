"""Checkpoint files that cannot be loaded: missing, empty, truncated, not a checkpoint, a bad config.json, a bad
shard index, pickled objects; each error names the file and what was expected.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from segformer_fast.model import key_families
from segformer_fast.model.segformer import Segformer

from checkpoint_files import assert_same_logits, clone_tensors, hub_state_dict, write_checkpoint, write_hub_folder

transformers = pytest.importorskip("transformers", reason="transformers is the independent implementation")


# ---------------------------------------------------------------------------------------------------------------
# 3. errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Segformer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Segformer.from_pretrained(str(tmp_path / "nowhere"))


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(Segformer.from_config("b0", 2).config.to_transformers_dict()))
    with pytest.raises(FileNotFoundError, match=r"empty-model.*model\.safetensors.*pytorch_model\.bin"):
        Segformer.from_pretrained(folder)


def test_hub_id_not_in_offline_cache():
    repo_id = "nvidia/segformer-b0-finetuned-ade-512-512"
    with pytest.raises(FileNotFoundError) as info:
        Segformer.from_pretrained(repo_id)
    message = str(info.value)
    assert repo_id in message
    assert "model.safetensors" in message and "pytorch_model.bin" in message and "config.json" in message
    assert os.environ["HF_HUB_CACHE"] in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*empty"):
        Segformer.from_pretrained(path)


def test_truncated_safetensors(tmp_path):
    path = write_checkpoint(tmp_path / "full.safetensors", hub_state_dict(Segformer.from_config("b0", 2)))
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(str(truncated)) + ".*safetensors"):
            Segformer.from_pretrained(truncated)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt", ".onnx", ".jpg"])
def test_a_file_that_is_not_a_checkpoint_is_named_with_the_formats(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(range(256)) * 7)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a checkpoint: expected a .safetensors") as err:
        Segformer.from_pretrained(path)
    assert "weights_only" not in str(err.value), "torch's advice to unpickle with weights_only=False was passed on"


def test_truncated_torch_file(tmp_path):
    path = write_checkpoint(tmp_path / "full.pth", hub_state_dict(Segformer.from_config("b0", 2)))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        Segformer.from_pretrained(truncated)


@pytest.mark.parametrize(
    "payload,kind",
    [
        ([torch.zeros(3), torch.ones(2)], "list"),
        (torch.zeros(3, 3), "Tensor"),
        ({}, "dict"),
        ({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, None),  # unwrapped, then an unknown key family
        ({"weight": torch.zeros(2), "epoch": 3}, "dict"),
    ],
    ids=["list", "tensor", "empty-dict", "wrapped-unknown", "mixed-values"],
)
def test_torch_file_not_a_dict_of_tensors(tmp_path, payload, kind):
    path = tmp_path / "odd.pth"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Segformer.from_pretrained(path)
    if kind is not None:
        assert "dict of tensors" in str(info.value) and kind in str(info.value)


def test_torch_file_with_keys_that_are_not_names(tmp_path):
    path = tmp_path / "numbered.pth"
    torch.save({1: torch.zeros(2), "decode_head.classifier.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*tensor names.*1 \\(int\\)"):
        Segformer.from_pretrained(path)


def test_unknown_key_family(tmp_path):
    keys = [f"encoder_{i}.layer.weight" for i in range(8)]
    path = write_checkpoint(tmp_path / "resnet.safetensors", {k: torch.zeros(2) for k in keys})
    with pytest.raises(ValueError) as info:
        Segformer.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "unrecognized checkpoint keys" in message
    assert all(k in message for k in sorted(keys)[:5])


def test_to_family_unknown_family():
    with pytest.raises(ValueError, match="unknown key family 'mmseg1'"):
        key_families.to_family({}, "mmseg1")


def test_invalid_config_json_syntax(tmp_path):
    folder = write_hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    (folder / "config.json").write_text('{"hidden_sizes": [32, 64, 160, 256],')
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json")) + ".*JSON"):
        Segformer.from_pretrained(folder)


@pytest.mark.parametrize(
    "change,what",
    [
        ({"hidden_sizes": [48, 96, 240, 384]}, "embed dims [48, 96, 240, 384]"),
        ({"depths": [2, 2, 3, 2]}, "depths [2, 2, 3, 2]"),
        ({"sr_ratios": [8, 4, 2, 2]}, "sr_ratios [8, 4, 2, 2]"),
        ({"hidden_sizes": None}, "missing 'hidden_sizes'"),
    ],
    ids=["hidden_sizes", "depths", "sr_ratios", "no-hidden-sizes"],
)
def test_config_json_matching_no_variant(tmp_path, change, what):
    folder = write_hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json"))) as info:
        Segformer.from_pretrained(folder)
    assert what in str(info.value), str(info.value)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"segformer"', "null"])
def test_config_json_not_an_object(tmp_path, content):
    folder = write_hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    (folder / "config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json"))):
        Segformer.from_pretrained(folder)


@pytest.mark.parametrize(
    "change,what",
    [
        ({"hidden_sizes": None, "_keep_none": True}, "hidden_sizes must be a list of integers, got None"),
        ({"depths": "2,2,2,2"}, "depths must be a list of integers"),
        ({"hidden_sizes": [32, 64, 160.0, 256]}, "hidden_sizes must be a list of integers"),
        ({"num_labels": "2"}, "num_labels must be an integer, got '2'"),
        ({"num_labels": True}, "num_labels must be an integer, got True"),
        ({"num_labels": 0, "id2label": {}}, "num_labels must be a positive integer, got 0"),
        ({"decoder_hidden_size": [256]}, "decoder_hidden_size must be an integer"),
        ({"id2label": ["wall", "floor"]}, "id2label must be an object"),
        ({"id2label": {"zero": "wall", "1": "floor"}}, "id2label keys must be integer class ids, got 'zero'"),
        ({"id2label": {"0": None, "1": "floor"}}, "id2label['0'] must be a string"),
        ({"sr_ratios": None, "_keep_none": True}, "sr_ratios must be a list of integers, got None"),
        ({"segformer_fast_eps_convention": 3}, "segformer_fast_eps_convention must be one of"),
    ],
    ids=["null-dims", "str-depths", "float-dim", "str-labels", "bool-labels", "zero-labels", "list-decoder",
         "list-id2label", "non-int-id", "null-name", "null-sr", "int-eps"],
)
def test_config_json_malformed_fields_name_the_file_and_field(tmp_path, change, what):
    folder = write_hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    config = json.loads((folder / "config.json").read_text())
    keep_none = change.pop("_keep_none", False)
    config.update(change)
    if not keep_none:
        config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json"))) as info:
        Segformer.from_pretrained(folder)
    assert what in str(info.value), str(info.value)


def _sharded_folder(folder: Path, model: Segformer, shard_names: list) -> Path:
    """A hub folder whose weights are split over ``shard_names`` (paths relative to ``folder``) by an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_transformers_dict()))
    state = clone_tensors(hub_state_dict(model))
    keys = sorted(state)
    weight_map = {}
    for number, name in enumerate(shard_names):
        part = keys[number::len(shard_names)]
        shard = folder / name
        shard.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: state[k] for k in part}, str(shard))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_index_loads_shards_inside_the_folder(tmp_path):
    source = Segformer.from_config("b0", num_labels=3, seed=61)
    folder = _sharded_folder(tmp_path / "m", source, ["part-1.safetensors", "sub/part-2.safetensors"])
    assert_same_logits(Segformer.from_pretrained(folder), source, 62, "sharded checkpoint")


@pytest.mark.parametrize("escape", ["../elsewhere/part-2.safetensors", "ABSOLUTE", "link/part-2.safetensors"])
def test_sharded_index_refuses_shards_outside_the_folder(tmp_path, escape):
    source = Segformer.from_config("b0", num_labels=3, seed=63)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if escape == "ABSOLUTE":
        escape = str(outside / "part-2.safetensors")
    if escape.startswith("link/"):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "link").symlink_to(outside)
    folder = _sharded_folder(tmp_path / "m", source, ["part-1.safetensors", escape])
    assert (outside / "part-2.safetensors").is_file()  # the file exists: only the location is wrong
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json.*outside the checkpoint folder"):
        Segformer.from_pretrained(folder)


@pytest.mark.parametrize("index", ['{"weight_map": null}', '{"weight_map": {"a": 3}}', "[]", '{"weight_map": {}}'])
def test_sharded_index_malformed(tmp_path, index):
    folder = write_hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: .*(weight index|shard file name)"):
        Segformer.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_tensor_in_a_float_slot_is_refused_by_name(tmp_path, dtype):
    state = hub_state_dict(Segformer.from_config("b0", num_labels=2, seed=64))
    key = "segformer.encoder.block.1.0.attention.self.query.weight"
    state[key] = torch.ones_like(state[key], dtype=dtype)
    path = write_checkpoint(tmp_path / "w.safetensors", state)
    with pytest.raises(ValueError, match=re.escape(key) + r".*expected a floating-point tensor"):
        Segformer.from_pretrained(path)


class _Payload:
    """Unpickling this would run ``marker.touch()``: weights_only=True must refuse it before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["top", "inside-state-dict"])
def test_pickled_custom_object_is_refused(tmp_path, where):
    marker = tmp_path / "code-ran"
    payload = _Payload(marker)
    state = hub_state_dict(Segformer.from_config("b0", num_labels=2))
    obj = payload if where == "top" else {"state_dict": state, "meta": {"hook": payload}}
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a checkpoint"):
        Segformer.from_pretrained(path)
    assert not marker.exists(), "the pickle's code ran: torch.load was not called with weights_only=True"
