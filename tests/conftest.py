"""Test-wide settings: nothing is downloaded, and the Hugging Face cache is a private empty folder."""

import os
import tempfile

# Set before huggingface_hub (imported by transformers and by our hub-id loader) reads its constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="segformer-fast-hf-cache-")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
