"""Hub ids loaded through huggingface_hub's cache (offline, never downloaded), and torch.load's weights_only contract.
"""

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from segformer_fast.model import checkpoints
from segformer_fast.model.segformer import Segformer

from checkpoint_files import assert_same_logits, clone_tensors, hub_state_dict, write_checkpoint, write_hub_folder

transformers = pytest.importorskip("transformers", reason="transformers is the independent implementation")


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
    return lambda path: write_checkpoint(path, clone_tensors(hub_state_dict(model)))


def test_hub_id_from_cache_safetensors():
    source = Segformer.from_config("b0", num_labels=6, seed=41)
    snapshot = _cache_repo(
        "segformer-fast-test/cached-b0",
        {"config.json": _config_writer(source), "model.safetensors": _weights_writer(source)},
    )
    assert checkpoints.resolve_hub_id("segformer-fast-test/cached-b0") == snapshot
    model = Segformer.from_pretrained("segformer-fast-test/cached-b0")
    assert model.config.num_labels == 6
    assert_same_logits(model, source, 42, "hub id from cache")


def test_hub_id_from_cache_pytorch_model_bin():
    source = Segformer.from_config("b0", num_labels=2, seed=43)
    _cache_repo(
        "segformer-fast-test/cached-bin",
        {"config.json": _config_writer(source), "pytorch_model.bin": _weights_writer(source)},
    )
    assert_same_logits(Segformer.from_pretrained("segformer-fast-test/cached-bin"), source, 44, "hub id, .bin")


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
    assert_same_logits(Segformer.from_pretrained("segformer-fast-test/partial"), source, 46, "partial snapshot")


def test_hub_id_cached_without_weights():
    source = Segformer.from_config("b0", num_labels=3, seed=47)
    snapshot = _cache_repo("segformer-fast-test/config-only", {"config.json": _config_writer(source)})
    with pytest.raises(FileNotFoundError, match=re.escape(str(snapshot)) + ".*model.safetensors"):
        Segformer.from_pretrained("segformer-fast-test/config-only")


def test_local_folder_wins_over_hub_id(tmp_path, monkeypatch):
    source = Segformer.from_config("b0", num_labels=2, seed=48)
    write_hub_folder(tmp_path / "org" / "name", source)
    monkeypatch.chdir(tmp_path)

    def no_hub(repo_id):
        raise AssertionError(f"resolve_hub_id called for an existing local folder {repo_id}")

    monkeypatch.setattr(checkpoints, "resolve_hub_id", no_hub)
    assert_same_logits(Segformer.from_pretrained("org/name"), source, 49, "relative local folder")


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
    state = hub_state_dict(source)
    paths = [write_checkpoint(tmp_path / f"w{suffix}", state, wrapped=wrapped)
             for suffix in (".pth", ".pt", ".bin") for wrapped in (False, True)]
    paths.append(write_hub_folder(tmp_path / "bin-folder", source, "pytorch_model.bin"))
    official = {k[len("backbone."):]: v for k, v in sources["official"][0].items() if k.startswith("backbone.")}
    paths.append(write_checkpoint(tmp_path / "mit.pth", official))
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
