from __future__ import annotations

import pytest
import torch

from hessrank.data import IGNORE_INDEX
from hessrank.tasks import causal_lm_loss, loss_weight


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_causal_loss_matches_transformers_shifted_loss():
    m = tiny_llama()
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[mask == 0] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ours = causal_lm_loss(m, batch)
    ref = m(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert loss_weight(batch) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_causal_loss_without_answer_tokens_is_an_error():
    from hessrank.errors import HessrankError

    m = tiny_llama()
    ids = torch.randint(0, 50, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    with pytest.raises(HessrankError, match="no answer tokens"):
        causal_lm_loss(m, batch)
