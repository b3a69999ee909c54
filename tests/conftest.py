"""Test-wide settings: no hub access, a local HF cache, one thread per intra-op pool."""

import os
from pathlib import Path

# Set before transformers or datasets are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parent.parent / ".hf_home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
