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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smollm2_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer random BERT with MiniLM's tokenizer, saved as a local model folder."""
    import torch
    from transformers import BertConfig, BertModel

    from hessrank.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("minilm-l6")
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    d = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def sentiment_tsv(tmp_path):
    import random

    rng = random.Random(0)
    pos = ["good", "great", "lovely", "wonderful", "fine"]
    neg = ["bad", "awful", "dull", "boring", "poor"]
    rows = ["text\tlabel"]
    for i in range(120):
        y = i % 2
        words = [rng.choice(pos if y else neg) for _ in range(3)] + ["film", "story"][i % 2 :]
        rows.append(f"a {' '.join(words)} movie\t{y}")
    f = tmp_path / "sentiment.tsv"
    f.write_text("\n".join(rows) + "\n")
    return f


# property tests draw the same examples on every run (CI and here): a failure is reproducible, not a dice roll
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("hessrank", derandomize=True)
_hyp_settings.load_profile("hessrank")
