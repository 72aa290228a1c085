"""save_pretrained: atomic (a failure leaves the folder as it was), other files kept, hub key names written.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segformer_fast.core import fileio
from segformer_fast.model import checkpoints
from segformer_fast.model.segformer import Segformer

from checkpoint_files import assert_same_logits, hub_state_dict

transformers = pytest.importorskip("transformers", reason="transformers is the independent implementation")


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
        assert_same_logits(Segformer.from_pretrained(target), old, 53, "old folder after a failed save")
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
    assert_same_logits(model, new, 58, "saved into an existing folder")


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
    expected = hub_state_dict(model)
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "segformer" and config["num_labels"] == 2 and config["dtype"] == "float32"
