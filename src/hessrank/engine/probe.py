"""Where the loss is measured: fitting a new classification head before the Hessian is taken.

A sequence classifier built on a pretrained encoder gets a *randomly initialised* head. The Hessian of the loss
at (pretrained body, random head) says little about fine-tuning: the loss is near ln(K), the gradient is dominated
by the head, and the body's curvature reflects a head that will be gone after a few steps. hessrank therefore
analyses the point (pretrained body, **fitted head**): a linear probe. The head's input features are captured
from the model itself (a forward hook on the head module, so any architecture's own pooling is used), and the
head's parameters are fitted by full-batch L-BFGS on the mean cross-entropy plus a small L2 penalty
(``weight_decay``·‖W‖²/2) on up to ``max_examples`` training examples. Dropout is off (eval mode).

This matches "linear probing then fine-tuning" (LP-FT; Kumar et al., *Fine-Tuning can Distort Pretrained
Features*, ICLR 2022), where fitting the head first is also the recommended way to start fine-tuning.

A causal LM on a prompt→answer task needs no new head: the analysis point is the pretrained model itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HessrankError
from ..models import HEAD_NAMES
from .tasks import _forward_kwargs, batch_to

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    head: str
    examples: int
    loss_before: float
    loss_after: float
    accuracy_after: float
    iterations: int


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classification head module (``classifier``, ``score``, ...)."""
    for name in HEAD_NAMES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return name, mod
    raise HessrankError(f"{type(model).__name__} has no classification head named {', '.join(HEAD_NAMES)}")


@torch.no_grad()
def _features(
    model: nn.Module, head: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    feats: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        feats.append(args[0].detach())

    h = head.register_forward_pre_hook(hook)
    labels = []
    try:
        for b in batches:
            b = batch_to(b, device)
            model(**_forward_kwargs(b))
            labels.append(b["labels"])
    finally:
        h.remove()
    return torch.cat(feats), torch.cat(labels)


def fit_head(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit the classification head on ``batches`` (features from the frozen body) in place."""
    model.eval()
    name, head = find_head(model)
    device = next(head.parameters()).device
    X, y = _features(model, head, batches, device)
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    weights = [p for p in params if p.dim() > 1]

    def objective() -> torch.Tensor:
        logits = head(X)
        return F.cross_entropy(logits.float(), y) + 0.5 * weight_decay * sum((w.float() ** 2).sum() for w in weights)

    with torch.no_grad():
        before = float(F.cross_entropy(head(X).float(), y))
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10
    )
    iters = 0

    def closure() -> torch.Tensor:
        nonlocal iters
        iters += 1
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    for p in params:
        p.grad = None
    with torch.no_grad():
        logits = head(X).float()
        after = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(-1) == y).float().mean())
    log.info("linear probe on %d examples: loss %.4f -> %.4f, train accuracy %.3f", len(y), before, after, acc)
    return ProbeResult(name, len(y), before, after, acc, iters)
