from __future__ import annotations

import pytest
import torch

from hessrank.data import IGNORE_INDEX
from hessrank.engine.tasks import causal_lm_loss, loss_weight


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


def test_batch_to_moves_tensors_only():
    from hessrank.engine.tasks import batch_to

    b = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "keep"}
    assert batch_to(b, None) is b
    moved = batch_to(b, "meta")
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "keep"
    assert b["input_ids"].device.type == "cpu"  # the caller's batch is left alone


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::scipy.stats.ConstantInputWarning")
def test_quantization_measurement_puts_held_out_batches_on_the_operator_device(monkeypatch):
    """Regression: on CUDA the held-out batches stayed on the CPU while the model was on cuda:0."""
    import hessrank.engine.tasks as T
    from fixtures import tiny_bert
    from hessrank import HessianOperator
    from hessrank.engine.quantization import measure_quantization

    model, batches, loss_fn = tiny_bert(dtype=torch.float32)
    op = HessianOperator(model, loss_fn, batches[:1], params=["query", "value"])
    held_out = batches[1:]
    seen: list[tuple[int, str]] = []
    real = T.batch_to

    def spy(b, device):
        seen.append((id(b), str(device)))
        return real(b, device)

    monkeypatch.setattr(T, "batch_to", spy)
    measure_quantization(model, loss_fn, "seq-cls", op, held_out, ["int8"], sign_probes=1, exact=False)
    assert {i for i, _ in seen} >= {id(b) for b in held_out}
    assert {d for i, d in seen if i in {id(b) for b in held_out}} == {str(op.device)}
