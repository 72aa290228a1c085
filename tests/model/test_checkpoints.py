"""Loading every checkpoint format (segformer_fast.model.checkpoints): hub folders, single files of every key family
in every layout, backbone-only files. Every checkpoint is generated here from random weights (B0 only); nothing is
downloaded (tests/conftest.py makes the Hugging Face hub offline with a private, empty cache).
"""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from segformer_fast.model import key_families
from segformer_fast.model.segformer import Segformer

from checkpoint_files import (
    ID2LABEL,
    NUM_LABELS,
    RTOL,
    assert_same_logits,
    hub_state_dict,
    logits_of,
    random_pixels,
    write_checkpoint,
    write_hub_folder,
)
from helpers import assert_relative_close, randomize_norms_

transformers = pytest.importorskip("transformers", reason="transformers is the independent implementation")


# ---------------------------------------------------------------------------------------------------------------
# 1. every format


def test_hub_folder_safetensors_written_by_transformers(sources):
    model = Segformer.from_pretrained(sources["hf_folder"])
    assert (model.config.variant, model.config.num_labels, model.config.eps_convention) == (
        "b0", NUM_LABELS, "transformers"
    )
    assert model.config.id2label == ID2LABEL
    assert model.source_family == "hub"
    assert_same_logits(model, sources["hf_model"], 11, "hub folder (model.safetensors)")


def test_hub_folder_pytorch_model_bin_only(tmp_path):
    source = Segformer.from_config("b0", num_labels=3, seed=7)
    folder = write_hub_folder(tmp_path / "bin", source, "pytorch_model.bin")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    model = Segformer.from_pretrained(folder)
    assert (model.config.variant, model.config.num_labels) == ("b0", 3)
    assert_same_logits(model, source, 12, "hub folder (pytorch_model.bin)")


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
    path = write_checkpoint(tmp_path / f"weights{suffix}", state_dict, wrapped=layout == "wrapped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without a backbone-only warning
        model = Segformer.from_pretrained(path)
    assert model.source_family == family
    assert (model.config.variant, model.config.num_labels, model.config.eps_convention) == ("b0", NUM_LABELS, eps)
    block_norm = model.stages[2].blocks[1].norm1.eps
    assert block_norm == (1e-6 if eps == "official" else 1e-5)
    seed = SINGLE_FILES.index((family, suffix, layout)) + 100
    assert_same_logits(model, reference, seed, f"{family} {suffix} {layout}")


def test_official_file_loaded_with_transformers_eps_override(sources, tmp_path):
    state_dict, _, _ = sources["transformers5"]
    hub_model = Segformer.from_pretrained(write_checkpoint(tmp_path / "t5.pth", state_dict))
    official = key_families.to_family(hub_model.state_dict(), "official")
    path = write_checkpoint(tmp_path / "official.pth", official, wrapped=True)
    model = Segformer.from_pretrained(path, eps_convention="transformers")
    assert model.config.eps_convention == "transformers"
    assert_same_logits(model, sources["hf_model"], 13, "official keys of a transformers model")


def test_id2label_survives_load_save_load(sources, tmp_path):
    model = Segformer.from_pretrained(sources["hf_folder"])
    model.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    again = Segformer.from_pretrained(tmp_path / "ours")
    assert again.config.id2label == ID2LABEL and again.config.num_labels == NUM_LABELS
    assert again.config.eps_convention == "transformers"
    assert_same_logits(again, sources["hf_model"], 14, "load -> save_pretrained -> load")

    hf_config = transformers.SegformerConfig.from_pretrained(tmp_path / "ours")
    assert {int(k): v for k, v in hf_config.id2label.items()} == ID2LABEL
    assert hf_config.num_labels == NUM_LABELS and list(hf_config.hidden_sizes) == [32, 64, 160, 256]
    round_trip = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "ours").eval()
    assert_same_logits(again, round_trip, 15, "save_pretrained read by transformers")


def test_official_eps_convention_survives_save_pretrained(sources, tmp_path):
    _, official, _ = sources["official"]
    official.save_pretrained(tmp_path / "official")
    model = Segformer.from_pretrained(tmp_path / "official")
    assert model.config.eps_convention == "official"
    assert_same_logits(model, official, 16, "official eps through save_pretrained")


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    source = Segformer.from_config("b0", num_labels=4, seed=8)
    state = hub_state_dict(source)
    del state["decode_head.batch_norm.num_batches_tracked"]
    model = Segformer.from_pretrained(write_checkpoint(tmp_path / "w.safetensors", state))
    assert_same_logits(model, source, 17, "without num_batches_tracked")


# ---------------------------------------------------------------------------------------------------------------
# 2. backbone-only files


def _encoder_only(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("decode_head.")}


def _assert_same_features(loaded: Segformer, expected: list, seed: int, what: str) -> None:
    pixels = random_pixels(seed, 57, 70)
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
    path = write_checkpoint(tmp_path / f"mit_b0{suffix}", state)

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
    assert torch.isfinite(model(random_pixels(23))).all()

    with pytest.warns(UserWarning, match="random"):
        sized = Segformer.from_pretrained(path, num_labels=19)
    assert sized.config.num_labels == 19 and sized.decode_head.classifier.out_channels == 19
    assert logits_of(sized, random_pixels(24)).shape[1] == 19
    _assert_same_features(sized, expected, 25, "MiT backbone with num_labels=19")


def test_transformers_image_classification_backbone(tmp_path):
    config = transformers.SegformerConfig(num_labels=10)  # defaults are B0
    torch.manual_seed(31)
    classifier = transformers.SegformerForImageClassification(config).eval()
    randomize_norms_(classifier, 31)
    classifier.save_pretrained(tmp_path / "cls")
    state = load_file(str(tmp_path / "cls" / "model.safetensors"))
    assert state["classifier.weight"].dim() == 2 and any(k.startswith("segformer.encoder.") for k in state)
    path = write_checkpoint(tmp_path / "mit-b0-cls.safetensors", state)

    def expected(pixels):
        with torch.no_grad():
            return list(classifier.segformer(pixel_values=pixels, output_hidden_states=True).hidden_states)

    with pytest.warns(UserWarning, match="random"):
        model = Segformer.from_pretrained(path, num_labels=6)
    assert model.config.num_labels == 6 and model.source_family == "hub"
    assert model.config.eps_convention == "transformers"
    _assert_same_features(model, expected, 32, "transformers classification backbone")
