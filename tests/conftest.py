"""Test-wide settings: nothing is downloaded, the Hugging Face cache is a private empty folder, and without a GPU
the Triton kernels run in the interpreter on CPU tensors."""

import os
import shutil
import tempfile

# Set before huggingface_hub (imported by transformers and by our hub-id loader) reads its constants.
os.environ["HF_HUB_OFFLINE"] = "1"
_HF_CACHE = tempfile.mkdtemp(prefix="segformer-fast-hf-cache-")
os.environ["HF_HUB_CACHE"] = _HF_CACHE
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402  (after the environment above)

# Triton reads TRITON_INTERPRET when kernels are defined, so it must be set before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_unconfigure(config):
    shutil.rmtree(_HF_CACHE, ignore_errors=True)
