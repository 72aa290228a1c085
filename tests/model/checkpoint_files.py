"""What the checkpoint tests share: the random B0's class count and seed, writing state dicts as files and hub
folders, and the logits check of a loaded model against the model it came from."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from segformer_fast.model import key_families
from segformer_fast.model.segformer import Segformer

from helpers import assert_relative_close

NUM_LABELS = 5


SEED = 1234


ID2LABEL = {0: "road", 1: "sidewalk", 2: "building", 3: "wall", 4: "fence"}


RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# helpers


def random_pixels(seed: int, height: int = 61, width: int = 83) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def clone_tensors(state_dict: dict) -> dict:
    """Independent contiguous copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def write_checkpoint(path: Path, state_dict: dict, wrapped: bool = False) -> Path:
    if path.suffix == ".safetensors":
        assert not wrapped, "safetensors holds a flat dict of tensors"
        save_file(clone_tensors(state_dict), str(path))
    else:
        torch.save({"state_dict": state_dict, "meta": {"epoch": 3, "note": "test"}} if wrapped else state_dict, path)
    return path


def hub_state_dict(model: Segformer) -> dict:
    return key_families.to_family(model.state_dict(), "hub")


def logits_of(model, pixels):
    with torch.no_grad():
        out = model(pixels) if isinstance(model, Segformer) else model(pixel_values=pixels).logits
    return out


def assert_same_logits(loaded: Segformer, reference, seed: int, what: str) -> None:
    pixels = random_pixels(seed)
    assert_relative_close(logits_of(loaded, pixels), logits_of(reference, pixels), RTOL, what)


def write_hub_folder(folder: Path, model: Segformer, weights: str = "model.safetensors") -> Path:
    """A hub-layout folder written without save_pretrained (config.json + one weights file, hub key names)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_transformers_dict()))
    write_checkpoint(folder / weights, clone_tensors(hub_state_dict(model)))
    return folder
