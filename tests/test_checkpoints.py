"""Checkpoint loading and saving (segformer_fast.model.checkpoints): every format, backbone-only files, hub-cache ids,
error messages, atomic save_pretrained, and torch.load's weights_only contract.

Every checkpoint is generated here from random weights (B0 only); nothing is downloaded (tests/conftest.py makes
the Hugging Face hub offline with a private, empty cache).
"""

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from segformer_fast.core import fileio
from segformer_fast.model import checkpoints, key_families
from segformer_fast.model.segformer import Segformer

from helpers import assert_relative_close, random_transformers_model, randomize_norms_

transformers = pytest.importorskip("transformers", reason="transformers is the independent implementation")

NUM_LABELS = 5
SEED = 1234
ID2LABEL = {0: "road", 1: "sidewalk", 2: "building", 3: "wall", 4: "fence"}
RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _pixels(seed: int, height: int = 61, width: int = 83) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """B0 on small inputs gains nothing from intra-op threads, and on a busy machine the thread pool's wake-ups
    dominate (tens of ms per op); restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clone(state_dict: dict) -> dict:
    """Independent contiguous copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def _write(path: Path, state_dict: dict, wrapped: bool = False) -> Path:
    if path.suffix == ".safetensors":
        assert not wrapped, "safetensors holds a flat dict of tensors"
        save_file(_clone(state_dict), str(path))
    else:
        torch.save({"state_dict": state_dict, "meta": {"epoch": 3, "note": "test"}} if wrapped else state_dict, path)
    return path


def _hub_state(model: Segformer) -> dict:
    return key_families.to_family(model.state_dict(), "hub")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per key family: (state dict as it would be in a file, model giving the expected logits, eps convention).

    hub and transformers5 tensors come from transformers itself (its save_pretrained writes hub names; its
    in-memory state dict has transformers>=5 names); official tensors from our model with the official eps.
    """
    folder = tmp_path_factory.mktemp("hf")
    hf_model = random_transformers_model("b0", NUM_LABELS, SEED)
    hf_model.config.id2label = dict(ID2LABEL)
    hf_model.config.label2id = {v: k for k, v in ID2LABEL.items()}
    hf_model.save_pretrained(folder)
    official = Segformer.from_config("b0", num_labels=NUM_LABELS, seed=SEED + 1, eps_convention="official")
    return {
        "hf_model": hf_model,
        "hf_folder": folder,
        "hub": (load_file(str(folder / "model.safetensors")), hf_model, "transformers"),
        "transformers5": (_clone(hf_model.state_dict()), hf_model, "transformers"),
        "official": (key_families.to_family(official.state_dict(), "official"), official, "official"),
    }


def _logits(model, pixels):
    with torch.no_grad():
        out = model(pixels) if isinstance(model, Segformer) else model(pixel_values=pixels).logits
    return out


def _assert_same_logits(loaded: Segformer, reference, seed: int, what: str) -> None:
    pixels = _pixels(seed)
    assert_relative_close(_logits(loaded, pixels), _logits(reference, pixels), RTOL, what)


def _hub_folder(folder: Path, model: Segformer, weights: str = "model.safetensors") -> Path:
    """A hub-layout folder written without save_pretrained (config.json + one weights file, hub key names)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_transformers_dict()))
    _write(folder / weights, _clone(_hub_state(model)))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# 1. every format


def test_hub_folder_safetensors_written_by_transformers(sources):
    model = Segformer.from_pretrained(sources["hf_folder"])
    assert (model.config.variant, model.config.num_labels, model.config.eps_convention) == (
        "b0", NUM_LABELS, "transformers"
    )
    assert model.config.id2label == ID2LABEL
    assert model.source_family == "hub"
    _assert_same_logits(model, sources["hf_model"], 11, "hub folder (model.safetensors)")


def test_hub_folder_pytorch_model_bin_only(tmp_path):
    source = Segformer.from_config("b0", num_labels=3, seed=7)
    folder = _hub_folder(tmp_path / "bin", source, "pytorch_model.bin")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    model = Segformer.from_pretrained(folder)
    assert (model.config.variant, model.config.num_labels) == ("b0", 3)
    _assert_same_logits(model, source, 12, "hub folder (pytorch_model.bin)")


# Every family in every suffix; layouts (bare, {"state_dict": ..., "meta": ...}, "module." prefix) rotate so that
# every family meets every layout and every suffix meets every layout it can hold.
SINGLE_FILES = [
    ("hub", ".safetensors", "bare"), ("hub", ".bin", "wrapped"), ("hub", ".pth", "module"), ("hub", ".pt", "bare"),
    ("transformers5", ".safetensors", "module"), ("transformers5", ".bin", "bare"),
    ("transformers5", ".pth", "wrapped"), ("transformers5", ".pt", "module"),
    ("official", ".safetensors", "bare"), ("official", ".bin", "module"), ("official", ".pth", "wrapped"),
    ("official", ".pt", "wrapped"),
]


@pytest.mark.parametrize("family,suffix,layout", SINGLE_FILES, ids=["-".join(c) for c in SINGLE_FILES])
def test_single_file_every_family(sources, tmp_path, family, suffix, layout):
    state_dict, reference, eps = sources[family]
    if layout == "module":
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}
    path = _write(tmp_path / f"weights{suffix}", state_dict, wrapped=layout == "wrapped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without a backbone-only warning
        model = Segformer.from_pretrained(path)
    assert model.source_family == family
    assert (model.config.variant, model.config.num_labels, model.config.eps_convention) == ("b0", NUM_LABELS, eps)
    block_norm = model.stages[2].blocks[1].norm1.eps
    assert block_norm == (1e-6 if eps == "official" else 1e-5)
    seed = SINGLE_FILES.index((family, suffix, layout)) + 100
    _assert_same_logits(model, reference, seed, f"{family} {suffix} {layout}")


def test_official_file_loaded_with_transformers_eps_override(sources, tmp_path):
    state_dict, _, _ = sources["transformers5"]
    hub_model = Segformer.from_pretrained(_write(tmp_path / "t5.pth", state_dict))
    path = _write(tmp_path / "official.pth", key_families.to_family(hub_model.state_dict(), "official"), wrapped=True)
    model = Segformer.from_pretrained(path, eps_convention="transformers")
    assert model.config.eps_convention == "transformers"
    _assert_same_logits(model, sources["hf_model"], 13, "official keys of a transformers model")


def test_id2label_survives_load_save_load(sources, tmp_path):
    model = Segformer.from_pretrained(sources["hf_folder"])
    model.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    again = Segformer.from_pretrained(tmp_path / "ours")
    assert again.config.id2label == ID2LABEL and again.config.num_labels == NUM_LABELS
    assert again.config.eps_convention == "transformers"
    _assert_same_logits(again, sources["hf_model"], 14, "load -> save_pretrained -> load")

    hf_config = transformers.SegformerConfig.from_pretrained(tmp_path / "ours")
    assert {int(k): v for k, v in hf_config.id2label.items()} == ID2LABEL
    assert hf_config.num_labels == NUM_LABELS and list(hf_config.hidden_sizes) == [32, 64, 160, 256]
    round_trip = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "ours").eval()
    _assert_same_logits(again, round_trip, 15, "save_pretrained read by transformers")


def test_official_eps_convention_survives_save_pretrained(sources, tmp_path):
    _, official, _ = sources["official"]
    official.save_pretrained(tmp_path / "official")
    model = Segformer.from_pretrained(tmp_path / "official")
    assert model.config.eps_convention == "official"
    _assert_same_logits(model, official, 16, "official eps through save_pretrained")


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    source = Segformer.from_config("b0", num_labels=4, seed=8)
    state = _hub_state(source)
    del state["decode_head.batch_norm.num_batches_tracked"]
    model = Segformer.from_pretrained(_write(tmp_path / "w.safetensors", state))
    _assert_same_logits(model, source, 17, "without num_batches_tracked")


# ---------------------------------------------------------------------------------------------------------------
# 2. backbone-only files


def _encoder_only(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("decode_head.")}


def _assert_same_features(loaded: Segformer, expected: list, seed: int, what: str) -> None:
    pixels = _pixels(seed, 57, 70)
    with torch.no_grad():
        got = loaded.extract_features(pixels)
    for i, (g, e) in enumerate(zip(got, expected(pixels))):
        assert_relative_close(g, e, RTOL, f"{what} stage {i + 1}")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_imagenet_mit_backbone(tmp_path, suffix):
    source = Segformer.from_config("b0", num_labels=3, seed=21, eps_convention="official")
    official = key_families.to_family(_encoder_only(source.state_dict()), "official")
    state = {k[len("backbone."):]: v for k, v in official.items()}
    assert {"patch_embed1.proj.weight", "block1.0.attn.kv.weight", "norm1.weight"} <= set(state)
    generator = torch.Generator().manual_seed(5)
    state["head.weight"] = torch.randn(1000, 256, generator=generator)
    state["head.bias"] = torch.randn(1000, generator=generator)
    path = _write(tmp_path / f"mit_b0{suffix}", state)

    def expected(pixels):
        with torch.no_grad():
            return source.extract_features(pixels)

    with pytest.warns(UserWarning, match=r"mit_b0.*(backbone-only|decode head).*random") as record:
        model = Segformer.from_pretrained(path)
    assert str(path) in str(record[0].message)
    assert model.config.variant == "b0" and model.config.eps_convention == "official"
    assert model.source_family == "official"
    assert model.decode_head.classifier.out_channels == model.config.num_labels
    _assert_same_features(model, expected, 22, "MiT backbone")
    assert torch.isfinite(model(_pixels(23))).all()

    with pytest.warns(UserWarning, match="random"):
        sized = Segformer.from_pretrained(path, num_labels=19)
    assert sized.config.num_labels == 19 and sized.decode_head.classifier.out_channels == 19
    assert _logits(sized, _pixels(24)).shape[1] == 19
    _assert_same_features(sized, expected, 25, "MiT backbone with num_labels=19")


def test_transformers_image_classification_backbone(tmp_path):
    config = transformers.SegformerConfig(num_labels=10)  # defaults are B0
    torch.manual_seed(31)
    classifier = transformers.SegformerForImageClassification(config).eval()
    randomize_norms_(classifier, 31)
    classifier.save_pretrained(tmp_path / "cls")
    state = load_file(str(tmp_path / "cls" / "model.safetensors"))
    assert state["classifier.weight"].dim() == 2 and any(k.startswith("segformer.encoder.") for k in state)
    path = _write(tmp_path / "mit-b0-cls.safetensors", state)

    def expected(pixels):
        with torch.no_grad():
            return list(classifier.segformer(pixel_values=pixels, output_hidden_states=True).hidden_states)

    with pytest.warns(UserWarning, match="random"):
        model = Segformer.from_pretrained(path, num_labels=6)
    assert model.config.num_labels == 6 and model.source_family == "hub"
    assert model.config.eps_convention == "transformers"
    _assert_same_features(model, expected, 32, "transformers classification backbone")


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
    path = _write(tmp_path / "full.safetensors", _hub_state(Segformer.from_config("b0", 2)))
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
    path = _write(tmp_path / "full.pth", _hub_state(Segformer.from_config("b0", 2)))
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
    path = _write(tmp_path / "resnet.safetensors", {k: torch.zeros(2) for k in keys})
    with pytest.raises(ValueError) as info:
        Segformer.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "unrecognized checkpoint keys" in message
    assert all(k in message for k in sorted(keys)[:5])


def test_to_family_unknown_family():
    with pytest.raises(ValueError, match="unknown key family 'mmseg1'"):
        key_families.to_family({}, "mmseg1")


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
    path = _write(tmp_path / "w.pth", state)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {"missing": [key]}, str(info.value)


def test_one_unexpected_key(tmp_path):
    state = _hub_state(Segformer.from_config("b0", num_labels=4, seed=3))
    state["segformer.encoder.block.0.0.attention.self.extra.weight"] = torch.zeros(3)
    path = _write(tmp_path / "w.safetensors", state)
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
    path = _write(tmp_path / "w.pth", state, wrapped=True)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {
        "mis-shaped": [f"{key}: checkpoint {shape}, expected {expected}"]
    }, str(info.value)


def test_missing_unexpected_and_misshaped_together(tmp_path):
    state = _hub_state(Segformer.from_config("b0", num_labels=4, seed=3))
    del state["segformer.encoder.block.0.1.layer_norm_2.weight"]
    state["decode_head.extra.bias"] = torch.zeros(2)
    state["decode_head.linear_fuse.weight"] = torch.zeros(256, 1024, 1, 2)
    path = _write(tmp_path / "w.bin", state)
    with pytest.raises(ValueError) as info:
        Segformer.from_pretrained(path)
    assert _problem_sections(str(info.value)) == {
        "missing": ["segformer.encoder.block.0.1.layer_norm_2.weight"],
        "unexpected": ["decode_head.extra.bias"],
        "mis-shaped": ["decode_head.linear_fuse.weight: checkpoint (256, 1024, 1, 2), expected (256, 1024, 1, 1)"],
    }, str(info.value)


def test_config_num_labels_disagreeing_with_weights(tmp_path):
    source = Segformer.from_config("b0", num_labels=4, seed=3)
    folder = _hub_folder(tmp_path / "m", source)
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
    path = _write(tmp_path / "w.safetensors", state)
    with pytest.raises(ValueError) as info:
        Segformer.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "NaN or Inf" in message and key in message, message


def test_invalid_config_json_syntax(tmp_path):
    folder = _hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
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
    folder = _hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json"))) as info:
        Segformer.from_pretrained(folder)
    assert what in str(info.value), str(info.value)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"segformer"', "null"])
def test_config_json_not_an_object(tmp_path, content):
    folder = _hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
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
    folder = _hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
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
    state = _clone(_hub_state(model))
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
    _assert_same_logits(Segformer.from_pretrained(folder), source, 62, "sharded checkpoint")


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
    folder = _hub_folder(tmp_path / "m", Segformer.from_config("b0", num_labels=2))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: .*(weight index|shard file name)"):
        Segformer.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_tensor_in_a_float_slot_is_refused_by_name(tmp_path, dtype):
    state = _hub_state(Segformer.from_config("b0", num_labels=2, seed=64))
    key = "segformer.encoder.block.1.0.attention.self.query.weight"
    state[key] = torch.ones_like(state[key], dtype=dtype)
    path = _write(tmp_path / "w.safetensors", state)
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
    state = _hub_state(Segformer.from_config("b0", num_labels=2))
    obj = payload if where == "top" else {"state_dict": state, "meta": {"hook": payload}}
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a checkpoint"):
        Segformer.from_pretrained(path)
    assert not marker.exists(), "the pickle's code ran: torch.load was not called with weights_only=True"


# ---------------------------------------------------------------------------------------------------------------
# 4. hub ids through huggingface_hub's cache


def _cache_repo(repo_id: str, files: dict, listing: list | None = None) -> Path:
    """The huggingface_hub cache layout of ``repo_id`` at refs/main, built by hand in HF_HUB_CACHE.

    ``files``: name -> writer(path). ``listing``: file names of a cached tree listing (trees/<hash>.json, which
    snapshot_download writes when it lists a repo online); None for none.
    """
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    storage = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, writer in files.items():
        writer(snapshot / name)
    if listing is not None:
        (storage / "trees").mkdir()
        entries = {name: {"size": 1, "blob_id": format(i, "040x")} for i, name in enumerate(listing)}
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return snapshot


def _config_writer(model):
    return lambda path: path.write_text(json.dumps(model.config.to_transformers_dict()))


def _weights_writer(model):
    return lambda path: _write(path, _clone(_hub_state(model)))


def test_hub_id_from_cache_safetensors():
    source = Segformer.from_config("b0", num_labels=6, seed=41)
    snapshot = _cache_repo(
        "segformer-fast-test/cached-b0",
        {"config.json": _config_writer(source), "model.safetensors": _weights_writer(source)},
    )
    assert checkpoints.resolve_hub_id("segformer-fast-test/cached-b0") == snapshot
    model = Segformer.from_pretrained("segformer-fast-test/cached-b0")
    assert model.config.num_labels == 6
    _assert_same_logits(model, source, 42, "hub id from cache")


def test_hub_id_from_cache_pytorch_model_bin():
    source = Segformer.from_config("b0", num_labels=2, seed=43)
    _cache_repo(
        "segformer-fast-test/cached-bin",
        {"config.json": _config_writer(source), "pytorch_model.bin": _weights_writer(source)},
    )
    _assert_same_logits(Segformer.from_pretrained("segformer-fast-test/cached-bin"), source, 44, "hub id, .bin")


def test_hub_id_partial_snapshot_with_tree_listing():
    """The repo publishes both weight formats (as the nvidia SegFormer repos do); only config.json and
    model.safetensors were downloaded. Offline, that snapshot is complete for what the loader needs."""
    source = Segformer.from_config("b0", num_labels=3, seed=45)
    _cache_repo(
        "segformer-fast-test/partial",
        {"config.json": _config_writer(source), "model.safetensors": _weights_writer(source)},
        listing=[".gitattributes", "README.md", "config.json", "model.safetensors", "pytorch_model.bin",
                 "tf_model.h5"],
    )
    _assert_same_logits(Segformer.from_pretrained("segformer-fast-test/partial"), source, 46, "partial snapshot")


def test_hub_id_cached_without_weights():
    source = Segformer.from_config("b0", num_labels=3, seed=47)
    snapshot = _cache_repo("segformer-fast-test/config-only", {"config.json": _config_writer(source)})
    with pytest.raises(FileNotFoundError, match=re.escape(str(snapshot)) + ".*model.safetensors"):
        Segformer.from_pretrained("segformer-fast-test/config-only")


def test_local_folder_wins_over_hub_id(tmp_path, monkeypatch):
    source = Segformer.from_config("b0", num_labels=2, seed=48)
    _hub_folder(tmp_path / "org" / "name", source)
    monkeypatch.chdir(tmp_path)

    def no_hub(repo_id):
        raise AssertionError(f"resolve_hub_id called for an existing local folder {repo_id}")

    monkeypatch.setattr(checkpoints, "resolve_hub_id", no_hub)
    _assert_same_logits(Segformer.from_pretrained("org/name"), source, 49, "relative local folder")


# ---------------------------------------------------------------------------------------------------------------
# 5. save_pretrained atomicity


def _snapshot_tree(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _boom_after_partial_write(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"partial")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("failure", ["safetensors", "json"])
@pytest.mark.parametrize("existing", [False, True])
def test_save_pretrained_failure_leaves_target_unchanged(tmp_path, monkeypatch, failure, existing):
    parent = tmp_path / "models"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("keep")
    target = parent / "b0"
    old = Segformer.from_config("b0", num_labels=3, seed=51)
    if existing:
        old.save_pretrained(target)
        before = _snapshot_tree(target)
    new = Segformer.from_config("b0", num_labels=4, seed=52)
    if failure == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _boom_after_partial_write)
    else:
        def boom(*args, **kwargs):
            raise OSError("json write failed (simulated)")

        monkeypatch.setattr(checkpoints.json, "dumps", boom)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(target)
    monkeypatch.undo()
    if existing:
        assert sorted(p.name for p in parent.iterdir()) == ["b0", "neighbour.txt"]
        assert _snapshot_tree(target) == before
        _assert_same_logits(Segformer.from_pretrained(target), old, 53, "old folder after a failed save")
    else:
        assert sorted(p.name for p in parent.iterdir()) == ["neighbour.txt"]


def test_save_pretrained_failure_during_rename_keeps_old_files(tmp_path, monkeypatch):
    """The last step (renaming config.json into place) fails: the old files are intact, no temporary is left."""
    target = tmp_path / "b0"
    old = Segformer.from_config("b0", num_labels=3, seed=54)
    old.save_pretrained(target)
    before = _snapshot_tree(target)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst, *args, **kwargs):
        calls.append((Path(src), Path(dst)))
        if Path(dst) == target / "config.json":
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        Segformer.from_config("b0", num_labels=4, seed=55).save_pretrained(target)
    monkeypatch.undo()
    assert any(dst == target / "config.json" for _, dst in calls)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0"]
    assert _snapshot_tree(target) == before


def test_save_pretrained_keeps_other_files_in_the_folder(tmp_path):
    target = tmp_path / "out"
    Segformer.from_config("b0", num_labels=3, seed=56).save_pretrained(target)
    (target / "notes.txt").write_text("my training notes")
    (target / "pytorch_model.bin").write_bytes(b"another tool's file")
    new = Segformer.from_config("b0", num_labels=4, seed=57)
    new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "notes.txt",
                                                          "pytorch_model.bin"]
    assert (target / "notes.txt").read_text() == "my training notes"
    assert (target / "pytorch_model.bin").read_bytes() == b"another tool's file"
    model = Segformer.from_pretrained(target)
    assert model.config.num_labels == 4
    _assert_same_logits(model, new, 58, "saved into an existing folder")


def test_save_pretrained_creates_parents_and_normal_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    Segformer.from_config("b0", num_labels=2, seed=59).save_pretrained(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file").write_bytes(b"x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkdtemp's 0o700
    for name in ("model.safetensors", "config.json"):  # not mkstemp's 0o600
        assert (target / name).stat().st_mode & 0o777 == (plain / "file").stat().st_mode & 0o777, name


def test_save_pretrained_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        Segformer.from_config("b0", num_labels=2).save_pretrained(target)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_save_pretrained_writes_hub_keys(tmp_path):
    model = Segformer.from_config("b0", num_labels=2, seed=60)
    model.save_pretrained(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    expected = _hub_state(model)
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "segformer" and config["num_labels"] == 2 and config["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------------------
# 6. torch.load is only called with weights_only=True


def test_torch_load_always_weights_only(tmp_path, monkeypatch, sources):
    real_load = torch.load
    calls = []

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    source = Segformer.from_config("b0", num_labels=3, seed=61)
    state = _hub_state(source)
    paths = [_write(tmp_path / f"w{suffix}", state, wrapped=wrapped)
             for suffix in (".pth", ".pt", ".bin") for wrapped in (False, True)]
    paths.append(_hub_folder(tmp_path / "bin-folder", source, "pytorch_model.bin"))
    official = {k[len("backbone."):]: v for k, v in sources["official"][0].items() if k.startswith("backbone.")}
    paths.append(_write(tmp_path / "mit.pth", official))
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Segformer.from_pretrained(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError):
        Segformer.from_pretrained(garbage)
    assert len(calls) == len(paths) + 1
    assert all(kwargs.get("weights_only") is True for kwargs in calls), calls
