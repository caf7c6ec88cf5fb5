"""Tiny problems with dense ground truth, shared by the numerics tests.

* :func:`tiny_mlp` — a 2-layer tanh MLP classifier.
* :func:`tiny_llama` — a 2-layer Llama causal LM with attention, GQA, tied input/output embeddings, right
  padding and prompt masking (labels -100 on prompt and pad).
* :func:`tiny_bert` — a 2-layer BERT sequence classifier with padding masks.
* :func:`dense_hessian` — the exact Hessian of the weighted mean loss by ``torch.func.hessian`` (float64), with
  tied parameters written as one tensor used under every alias.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hessrank.data import IGNORE_INDEX
from hessrank.engine.tasks import causal_lm_loss, loss_weight, seq_cls_loss


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, d_hidden: int = 6, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["labels"])


def tiny_mlp(seed: int = 0, n: int = 12, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP().to(dtype)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [{"x": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, n, 4)]
    return model, batches, mlp_loss


def tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    attn: str = "eager",
    vocab: int = 24,
    hidden: int = 8,
    rows: int = 6,
    length: int = 7,
    batch_size: int = 3,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        attn_implementation=attn,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if dtype == torch.float64:
        _rmsnorm_in_input_dtype(model)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for r in range(rows):
        pad = r % 3  # right padding of 0..2 tokens
        if pad:
            ids[r, -pad:] = 0
            mask[r, -pad:] = 0
        prompt = 2 + r % 2
        labels[r, :prompt] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    batches = [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, rows, batch_size)
    ]
    return model, batches, causal_lm_loss


def _rmsnorm_in_input_dtype(model: nn.Module) -> None:
    """LlamaRMSNorm computes in float32 whatever the input dtype; for float64 ground truth keep float64."""
    import types

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(forward, mod)


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float64, rows: int = 6, length: int = 6):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.3,
        attention_probs_dropout_prob=0.3,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(1, 30, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        if r % 2:
            ids[r, -2:] = 0
            mask[r, -2:] = 0
    y = torch.randint(0, 2, (rows,), generator=g)
    batches = [
        {"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3], "labels": y[i : i + 3]}
        for i in range(0, rows, 3)
    ]
    return model, batches, seq_cls_loss


def dense_hessian(
    model: nn.Module, loss_fn: Callable, batches: Sequence[dict], names: Sequence[str], method: str = "func"
) -> torch.Tensor:
    """Exact Hessian of Σ_b n_b L_b / Σ n_b w.r.t. the named parameters (aliases of tied tensors included)."""
    from torch.nn.utils.stateless import _reparametrize_module

    model.eval()
    all_named = list(model.named_parameters(remove_duplicate=False))
    by_name = dict(all_named)
    aliases = {n: [a for a, p in all_named if p is by_name[n]] for n in names}
    shapes = [by_name[n].shape for n in names]
    sizes = [by_name[n].numel() for n in names]
    flat0 = torch.cat([by_name[n].detach().reshape(-1) for n in names])
    w = torch.tensor([float(loss_weight(b)) for b in batches], dtype=flat0.dtype)
    w = w / w.sum()

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        d = {}
        for n, t, s in zip(names, parts, shapes):
            for a in aliases[n]:
                d[a] = t.view(s)
        total = flat.new_zeros(())
        with _reparametrize_module(model, d, tie_weights=False, strict=False):
            for wb, b in zip(w, batches):
                total = total + wb * loss_fn(model, b)
        return total

    if method == "func":
        return torch.func.hessian(f)(flat0)
    return torch.autograd.functional.hessian(f, flat0)
