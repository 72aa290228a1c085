"""Fixtures of the model tests: one torch thread per module, and the state dicts of every key family."""

import pytest
import torch
from safetensors.torch import load_file

from segformer_fast.model import key_families
from segformer_fast.model.segformer import Segformer

from checkpoint_files import ID2LABEL, NUM_LABELS, SEED, clone_tensors
from helpers import random_transformers_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """B0 on small inputs gains nothing from intra-op threads, and on a busy machine the thread pool's wake-ups
    dominate (tens of ms per op); restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        "transformers5": (clone_tensors(hf_model.state_dict()), hf_model, "transformers"),
        "official": (key_families.to_family(official.state_dict(), "official"), official, "official"),
    }
