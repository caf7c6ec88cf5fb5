"""Shared fixtures. Tiny problems for numerics live in ``tests/fixtures.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent ({SHARED_DATA}); the shared-dataset tests need it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (fp32), loaded once per session (the first run converts GGUF → safetensors, ~40 s)."""
    from hessrank.models import load_model

    return load_model("smollm2-135m", "causal-lm")


@pytest.fixture(scope="session")
def minilm_cls():
    from hessrank.models import load_model

    return load_model("minilm-l6", "seq-cls", num_labels=2, seed=0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from hessrank.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
