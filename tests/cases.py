"""The model × loss × dtype case matrix shared by the curvature and Lanczos tests (as in curvlinops' test cases).

Each :class:`Case` builds a tiny problem twice from one seed: in the dtype under test (what the operator sees)
and in float64 (the dense ground truth by ``torch.func.hessian``, :func:`fixtures.dense_hessian`). Models: a tanh
MLP (cross-entropy and mean-squared error), a Llama causal LM (token cross-entropy with right padding, prompt
masking, tied embeddings, GQA) and a BERT classifier (padding masks, dropout switched off by the operator).
``hvp_tol`` is the relative error of the operator each dtype is held to: float64 to its round-off (Llama's
eager softmax computes in float32 whatever the input, hence its looser float64 bound), float32 to 2e-4;
``eig_tol`` bounds the Lanczos eigenvalues (1e-6 at a Lanczos tolerance of 1e-8 in float64, 2e-4 in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fixtures import dense_hessian, tiny_bert, tiny_llama, tiny_mlp

MLP_SCOPE = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def mlp_mse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error against one-hot targets: a loss with a constant output Hessian."""
    out = model(batch["x"])
    target = nn.functional.one_hot(batch["labels"], out.shape[-1]).to(out.dtype)
    return ((out - target) ** 2).sum(-1).mean()


def _mlp(dtype: torch.dtype):
    """tiny_mlp draws its inputs in the dtype asked for; draw them once in float64 and cast, so both dtypes see
    the same problem."""
    model, batches, loss = tiny_mlp(dtype=torch.float64)
    cast = [{"x": b["x"].to(dtype), "labels": b["labels"]} for b in batches]
    return model.to(dtype), cast, loss


def _mlp_ce(dtype: torch.dtype):
    model, batches, loss = _mlp(dtype)
    return model, batches, loss, MLP_SCOPE


def _mlp_mse(dtype: torch.dtype):
    model, batches, _ = _mlp(dtype)
    return model, batches, mlp_mse_loss, MLP_SCOPE


def _llama(dtype: torch.dtype):
    model, batches, loss = tiny_llama(dtype=dtype)
    return model, batches, loss, ["q_proj", "v_proj"]


def _bert(dtype: torch.dtype):
    model, batches, loss = tiny_bert(dtype=dtype)
    model.train()  # dropout 0.3: the operator must switch it off
    return model, batches, loss, ["query", "value", "classifier"]


@dataclass(frozen=True)
class Case:
    model: str
    loss: str
    dtype: torch.dtype
    build: Callable[[torch.dtype], tuple]
    hvp_tol: float
    eig_tol: float

    @property
    def id(self) -> str:
        return f"{self.model}-{self.loss}-{str(self.dtype).removeprefix('torch.')}"

    def problem(self):
        """(model, batches, loss_fn, scope patterns) in the case's dtype."""
        return self.build(self.dtype)

    def dense(self, param_names: list[str]) -> torch.Tensor:
        """The float64 Hessian of the same problem over the operator's resolved parameter names."""
        model, batches, loss, _ = self.build(torch.float64)
        return dense_hessian(model, loss, batches, param_names).detach()


_BUILDS = {
    ("mlp", "cross-entropy"): (_mlp_ce, 1e-12),
    ("mlp", "mse"): (_mlp_mse, 1e-12),
    ("llama", "causal-lm"): (_llama, 1e-8),
    ("bert", "seq-cls"): (_bert, 1e-10),
}

CASES: list[Case] = [
    Case(
        m,
        loss,
        dtype,
        build,
        tol64 if dtype == torch.float64 else 2e-4,
        1e-6 if dtype == torch.float64 else 2e-4,
    )
    for (m, loss), (build, tol64) in _BUILDS.items()
    for dtype in (torch.float64, torch.float32)
]
