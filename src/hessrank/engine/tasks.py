"""Task losses: the scalar mean loss of one batch, and how many items that mean is over.

``loss_fn(model, batch)`` is the contract :class:`hessrank.HessianOperator` consumes. The operator weights each
batch by :func:`loss_weight` so that the operator is the Hessian of the mean loss over *all* items (or loss
tokens) of all batches, whatever the batching: L = Σ_b n_b L_b / Σ_b n_b.

* ``causal-lm``: mean next-token cross-entropy over tokens whose label is not -100 (answer tokens for
  prompt→answer data). Logits are computed only at those positions (the output layer applied to the selected
  hidden states), which for prompt→label tasks avoids a (batch × length × vocabulary) logits tensor and its
  double-backward graph. Same value as transformers' own shifted loss.
* ``seq-cls``: mean cross-entropy of the class logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import HessrankError

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def batch_to(batch: dict[str, torch.Tensor], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """The batch with its tensors on ``device`` (unchanged when ``device`` is None)."""
    if device is None:
        return batch
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forward_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _selective_path(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (
        hasattr(model, "lm_head")
        and hasattr(model, "model")
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
    )


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the softmax; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def loss_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at the loss positions and their targets: (items × classes, items).

    ``seq-cls`` batches (1-D labels): the class logits and labels. Causal-LM batches (2-D labels): the next-token
    logits at positions whose shifted label is not -100 (answer tokens), computed by the selective path where the
    model allows it. Every loss hessrank differentiates is the cross-entropy of these.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return model(**_forward_kwargs(batch)).logits, labels
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    if not bool(keep.any()):
        raise HessrankError("a causal-lm batch has no answer tokens (every label is -100); check max_length")
    if _selective_path(model):
        hidden = model.model(**_forward_kwargs(batch), use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][keep])
    else:
        logits = model(**_forward_kwargs(batch), use_cache=False).logits[:, :-1][keep]
    return logits, target[keep]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over label tokens (labels != -100, shifted by one)."""
    logits, target = loss_logits(model, batch)
    return F.cross_entropy(_upcast(logits), target)


def seq_cls_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the classifier's logits."""
    logits, target = loss_logits(model, batch)
    return F.cross_entropy(_upcast(logits), target)


def loss_weight(batch: dict[str, torch.Tensor]) -> int:
    """Items the batch's mean loss averages over: label tokens (causal LM) or rows (classification)."""
    labels = batch.get("labels")
    if labels is None:
        first = next(iter(batch.values()))
        return int(first.shape[0])
    if labels.dim() >= 2:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])


def loss_fn_for(task: str) -> LossFn:
    """The loss function of a task name (causal-lm | seq-cls)."""
    if task == "causal-lm":
        return causal_lm_loss
    if task == "seq-cls":
        return seq_cls_loss
    raise HessrankError(f"task '{task}' is not one of causal-lm, seq-cls")
