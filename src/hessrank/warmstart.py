"""Warm start: LoRA adapters of the advised ranks initialised from a short higher-rank pilot run's update.

Measured on AG News (``reports/validation.md``, session 8): truncating a trained rank-64 update to rank 8 costs
0.0024 in held-out loss, while a rank-8 adapter trained from scratch ends 0.0061 behind rank 32 — a small rank can
*hold* nearly all of what a larger one learns, but does not *find* it from the default start (B = 0, A random).
This module tests the remedy that follows: train a rank-R pilot (R ≥ every advised rank) for T steps on the run's own
training split, then start each module's rank-r adapter at the best rank-r approximation of the pilot's update,

    ΔW_pilot = U S Vᵀ (SVD),   B = U_r S_r^½ / √s,   A = S_r^½ V_rᵀ / √s,   so that  s·B·A = [ΔW_pilot]_r,

with s = α/√r (rank-stable) or α/r the adapter's scaling (Eckart–Young: [·]_r is the Frobenius-optimal rank-r
approximation; S^½ on both factors balances their norms, as PiSSA does for the pretrained weights, Meng et al.,
NeurIPS 2024). The classification head the pilot trained (seq-cls) is carried over with it. Related inits from the
literature: LoRA-GA (Wang et al., NeurIPS 2024, the SVD of one full gradient), PiSSA (the weights' own SVD); the
pilot's update is the multi-step version of LoRA-GA's first step.

The pilot sees only the run's training split (never its held-out split), so the run's evaluation stays clean; its
steps are counted in ``metrics.json`` (``train_info.warm_start``) and belong to the run's training cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import HessrankError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PilotUpdate:
    """What a pilot run leaves for the warm start: ΔW per target (float64, CPU) and the trained head's state."""

    deltas: dict[str, torch.Tensor]
    head_state: dict[str, dict[str, torch.Tensor]]  #: head module name -> its trained state dict
    info: dict[str, Any]


def run_pilot(
    model: nn.Module,
    targets: Sequence[str],
    head: Sequence[str],
    task: str,
    train_items: Sequence[dict[str, Any]],
    collate: Any,
    steps: int,
    rank: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> PilotUpdate:
    """Train a rank-``rank`` rank-stable LoRA (:func:`hessrank.pilot.train_pilot`) on a copy of ``model``."""
    from .pilot import PilotSettings, train_pilot, updates
    from .tasks import loss_fn_for

    t0 = time.perf_counter()
    settings = PilotSettings(steps=steps, rank=rank, lr=lr, batch_size=batch_size, seed=seed)
    pm, losses = train_pilot(model, targets, head, task, loss_fn_for(task), train_items, collate, settings, progress)
    deltas = updates(pm, targets)
    named = dict(pm.base_model.model.named_modules())
    head_state = {}
    for h in head:
        wrapped = named[h]
        inner = wrapped.modules_to_save["default"] if hasattr(wrapped, "modules_to_save") else wrapped
        head_state[h] = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    tail = max(1, len(losses) // 10)
    info = {
        "steps": steps,
        "rank": rank,
        "lr": lr,
        "batch_size": batch_size,
        "train_loss_first": sum(losses[:tail]) / tail,
        "train_loss_last": sum(losses[-tail:]) / tail,
        "seconds": time.perf_counter() - t0,
    }
    del pm
    return PilotUpdate(deltas, head_state, info)


def balanced_factors(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with scaling·B·A = the best rank-``rank`` approximation of ``delta`` and ‖B‖ ≈ ‖A‖ (S^½ each side)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank > S.numel():
        raise HessrankError(f"warm start: rank {rank} exceeds the pilot update's rank bound {S.numel()}")
    root = (S[:rank] / scaling).sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def apply(pm: nn.Module, targets: Sequence[str], pilot: PilotUpdate) -> dict[str, int]:
    """Set every target's LoRA factors from the pilot's update and load the pilot's head; returns the ranks set."""
    named = dict(pm.base_model.model.named_modules())
    ranks = {}
    for t in targets:
        layer = named.get(t)
        if layer is None or not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            raise HessrankError(f"warm start: module '{t}' has no LoRA adapter to initialise")
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        r = A.shape[0]
        Bn, An = balanced_factors(pilot.deltas[t], r, float(layer.scaling["default"]))
        B.copy_(Bn.to(B.dtype))
        A.copy_(An.to(A.dtype))
        ranks[t] = r
    for h, state in pilot.head_state.items():
        wrapped = named.get(h)
        if wrapped is None:
            raise HessrankError(f"warm start: head module '{h}' not found in the adapted model")
        inner = wrapped.modules_to_save["default"] if hasattr(wrapped, "modules_to_save") else wrapped
        inner.load_state_dict(state)
    return ranks
