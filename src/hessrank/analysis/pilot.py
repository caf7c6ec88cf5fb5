"""The rank a short training run actually uses: a pilot LoRA update, truncated in K-FAC-whitened coordinates.

The curvature estimators at θ₀ (:mod:`hessrank.engine.kfac`, the top-k Newton step) see one quadratic model at the start
of training; fine-tuning leaves that region within a few dozen steps, and on harder tasks the rank they advise
reaches the model's first decrease but not the plateau (``reports/validation.md``: the K-FAC curves saturate at
rank 1–2 while the ladder keeps improving to rank 16–32). This module measures the rank along the trajectory
instead, in the spirit of the intrinsic-rank measurements of fine-tuning updates (Aghajanyan et al., ACL 2021;
Hu et al., ICLR 2022, §7 "the update matrix ΔW has a very low intrinsic rank"):

1. **Pilot.** A rank-R LoRA (rank-stable scaling α/√R, the advice's recipe; the classification head trains as in
   :func:`hessrank.trainer.train.build_peft_model`) is trained for T steps on the training split from the analysis
   point. Its update per module is ΔW_m = (α/√R)·B_m A_m (m × n, rank ≤ R).
2. **Whitened truncation.** Around the pilot's end point the loss is ≈ L(θ_T) + ½ δᵀHδ for a perturbation δ that
   removes part of the update (the gradient there is small next to the curvature along ΔW: the run has moved
   down along it), and with the K-FAC model H ≈ c·A ⊗ G (factors at θ₀, damped as in :mod:`hessrank.engine.kfac`):

       cost(δ) = (c/2)·‖Ḡ^½ δ Ā^½‖²_F.

   With Y = Ḡ^½ ΔW Ā^½ and singular values s₁ ≥ s₂ ≥ …, the cheapest rank-r approximation of ΔW in this metric is
   Δ_r = Ḡ^-½ [Y]_r Ā^-½ (Eckart–Young in whitened coordinates), and it keeps the share
   E_m(r) = Σ_{l≤r} s_l² / Σ_l s_l² of the module's quadratic value ½‖Y‖². These per-module curves allocate ranks
   exactly like the K-FAC curves do (gain per trainable parameter,
   :func:`hessrank.engine.lowrank.separable_allocation`).
3. **Measured check.** The quadratic model is only a guide: every candidate (each uniform rank r ≤ R, and the
   allocations that keep a share p of Σ_m ½‖Y_m‖²) is *applied* — the pilot's adapters replaced by the truncated
   updates — and its loss measured on held-out batches. With L₀ the held-out loss of rank 0 (the pilot's trained head
   and no update) and L_R that of the whole pilot, a candidate keeps the share (L₀ − L)/(L₀ − L_R) of the pilot's
   decrease. :mod:`hessrank.advisor.recommend` (estimator ``pilot``) advises the cheapest candidate that keeps the
   target share.

What it cannot see: directions the pilot did not reach in T steps (a longer run may use more rank), and truncation
of a trained rank-R update is pessimistic for a small rank (a rank-r run from scratch concentrates its update), so
the measured share errs towards larger ranks. Both are stated in the recommendation's notes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.kfac import Eig, ModuleStats, damping_split
from ..engine.lowrank import ModuleCurve, lora_params, separable_allocation
from ..engine.tasks import batch_to
from ..errors import HessrankError, NumericalError

log = logging.getLogger(__name__)

#: Shares of the whitened pilot energy whose allocations are measured (besides every uniform rank).
ALLOCATION_SHARES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass(frozen=True)
class PilotSettings:
    """The pilot run: ``steps`` AdamW steps of a rank-``rank`` LoRA at learning rate ``lr`` (linear warm-up over
    the first 10% then linear decay, the trainer's default schedule), batches of ``batch_size`` training examples;
    candidates measured on ``eval_batches`` held-out batches."""

    steps: int = 100
    rank: int = 64
    lr: float = 1e-3
    batch_size: int = 16
    eval_batches: int = 8
    alpha: float = 8.0
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "rank", "batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise HessrankError(f"pilot-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise HessrankError(f"pilot-lr must be positive, got {self.lr}")


# ----------------------------------------------------------------------------------------------------------
# the pilot run
# ----------------------------------------------------------------------------------------------------------


def _batches(items: Sequence[dict[str, Any]], collate: Any, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless batches: one seeded permutation per pass over ``items``."""
    rng = np.random.default_rng(seed)
    bs = min(batch_size, len(items))
    while True:
        perm = rng.permutation(len(items))
        for s in range(0, len(perm) - bs + 1, bs):
            yield collate([items[i] for i in perm[s : s + bs]])


def train_pilot(
    model: nn.Module,
    targets: Sequence[str],
    head: Sequence[str],
    task: str,
    loss_fn: Any,
    train_items: Sequence[dict[str, Any]],
    collate: Any,
    settings: PilotSettings,
    progress: bool = False,
) -> tuple[nn.Module, list[float]]:
    """Train the pilot LoRA on a copy of ``model``; returns the PEFT model and the training loss every step."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    settings.check()
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    conf = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        use_rslora=True,
        target_modules=list(targets),
        modules_to_save=list(head) or None,
        task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(model), conf)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, round(0.1 * settings.steps), settings.steps)
    it: Any = range(settings.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="pilot run", unit="step", leave=False)
    batches = _batches(train_items, collate, settings.batch_size, settings.seed)
    losses = []
    pm.train()
    inner = pm.get_base_model()  # the model with LoRA layers injected: the task losses' own forward paths apply
    for step in it:
        loss = loss_fn(inner, batch_to(next(batches), device))
        if not torch.isfinite(loss):
            raise NumericalError(f"pilot run: the training loss is {float(loss)} at step {step}; lower --pilot-lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    pm.eval()
    return pm, losses


def _lora_layers(pm: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """The PEFT LoRA layer of each target, by the target's name in the unwrapped model."""
    named = dict(pm.base_model.model.named_modules())
    out = {}
    for t in targets:
        layer = named.get(t)
        if layer is None or not hasattr(layer, "lora_A"):
            raise HessrankError(f"pilot run: module '{t}' got no LoRA layer")
        out[t] = layer
    return out


def updates(pm: nn.Module, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """ΔW_m = scaling·B·A of each target (m × n, float64, CPU)."""
    out = {}
    for t, layer in _lora_layers(pm, targets).items():
        B = layer.lora_B["default"].weight.detach().double().cpu()
        A = layer.lora_A["default"].weight.detach().double().cpu()
        out[t] = float(layer.scaling["default"]) * (B @ A)
    return out


# ----------------------------------------------------------------------------------------------------------
# whitened truncation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Whitened:
    """Y = Ḡ^½ ΔW Ā^½ of one module in its factors' eigenbases, with its SVD."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    sqrt_g: torch.Tensor  #: (wG + β)^½
    sqrt_a: torch.Tensor  #: (wA + α)^½
    eig: Eig

    @classmethod
    def of(cls, eig: Eig, delta_w: torch.Tensor, damping: float) -> Whitened:
        a, b = damping_split(eig, damping)
        sa, sg = (eig.wA + a).sqrt(), (eig.wG + b).sqrt()
        Y = (sg[:, None] * (eig.UG.T @ delta_w @ eig.UA)) * sa[None, :]
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        return cls(U, S, Vh, sg, sa, eig)

    def energy_share(self, rank: int) -> float:
        """E(r) = Σ_{l≤r} s_l² / Σ_l s_l²."""
        e = self.S**2
        tot = float(e.sum())
        return float(e[:rank].sum()) / tot if tot > 0 else 1.0

    @property
    def value(self) -> float:
        """½‖Y‖²_F: the update's quadratic value in K-FAC units (multiply by the scale c for loss units)."""
        return 0.5 * float((self.S**2).sum())

    def truncated_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with L·R = Δ_r = Ḡ^-½ [Y]_r Ā^-½: L = U_G diag(ḡ^-½) U_r S_r (m × r), R = V_rᵀ diag(ā^-½) U_Aᵀ."""
        L = self.eig.UG @ ((self.U[:, :rank] * self.S[:rank]) / self.sqrt_g[:, None])
        R = (self.Vh[:rank] / self.sqrt_a[None, :]) @ self.eig.UA.T
        return L, R

    def truncated(self, rank: int) -> torch.Tensor:
        """Δ_r in weight coordinates (m × n)."""
        L, R = self.truncated_factors(rank)
        return L @ R


def whitened_updates(
    deltas: dict[str, torch.Tensor], stats: dict[str, ModuleStats], z: float
) -> tuple[dict[str, Whitened], float]:
    """Each module's whitened update, damped by δ = z·max_m λ_max(A_m ⊗ G_m) (the K-FAC curves' damping)."""
    eigs = {m: stats[m].eig for m in deltas}
    damping = z * max(e.lambda_max for e in eigs.values())
    return {m: Whitened.of(eigs[m], d, damping) for m, d in deltas.items()}, damping


class Truncation:
    """Replace the pilot's adapters by rank-r truncations of its updates, and put them back."""

    def __init__(self, pm: nn.Module, targets: Sequence[str]):
        self.layers = _lora_layers(pm, targets)
        self.saved = {
            t: (la.lora_A["default"].weight.detach().clone(), la.lora_B["default"].weight.detach().clone())
            for t, la in self.layers.items()
        }

    @torch.no_grad()
    def set(self, new: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make module m's adapter equal L·R for ``new[m] = (L, R)`` (m × k and k × n, k ≤ the pilot rank):
        B = [L/scaling, 0], A = [R; 0]."""
        for t, la in self.layers.items():
            A, B = la.lora_A["default"].weight, la.lora_B["default"].weight
            L, R = new[t]
            k = L.shape[1]
            if k > A.shape[0]:
                raise HessrankError(f"pilot: rank {k} for '{t}' exceeds the pilot rank {A.shape[0]}")
            Bn = torch.zeros(B.shape, dtype=torch.float64)
            An = torch.zeros(A.shape, dtype=torch.float64)
            Bn[:, :k] = L / float(la.scaling["default"])
            An[:k] = R
            B.copy_(Bn.to(B.dtype))
            A.copy_(An.to(A.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for t, la in self.layers.items():
            A, B = self.saved[t]
            la.lora_A["default"].weight.copy_(A)
            la.lora_B["default"].weight.copy_(B)


def measure(
    pm: nn.Module,
    targets: Sequence[str],
    whitened: dict[str, Whitened],
    shapes: dict[str, tuple[int, int]],
    loss_of: Any,
    rank_grid: Sequence[int],
    pilot_rank: int,
    shares: Sequence[float] = ALLOCATION_SHARES,
) -> dict[str, Any]:
    """Held-out losses of rank 0, the whole pilot, every uniform rank and every share allocation."""
    tr = Truncation(pm, targets)
    seen: dict[tuple[int, ...], float] = {}

    def loss_at(ranks: dict[str, int]) -> float:
        key = tuple(ranks[m] for m in targets)
        if key not in seen:  # allocations at neighbouring shares often coincide: measured once
            tr.set({m: whitened[m].truncated_factors(r) for m, r in ranks.items()})
            seen[key] = float(loss_of(pm))
        return seen[key]

    try:
        full = float(loss_of(pm))
        l0 = loss_at({m: 0 for m in targets})
        grid = sorted({r for r in rank_grid if r <= pilot_rank} | {pilot_rank})
        uniform = []
        for r in grid:
            rk = {m: r for m in targets}
            uniform.append({"rank": r, "ranks": rk, "params": _params(rk, shapes), "eval_loss": loss_at(rk)})
        curves = [
            ModuleCurve(
                m, *shapes[m], tuple(grid), tuple(whitened[m].value * whitened[m].energy_share(r) for r in grid)
            )
            for m in targets
        ]
        allocations = []
        for p in shares:
            rk, params, reached = separable_allocation(curves, share=p, floor={m: 1 for m in targets})
            allocations.append(
                {"share": p, "ranks": rk, "params": params, "energy_share": reached, "eval_loss": loss_at(rk)}
            )
    finally:
        tr.restore()
    for row in uniform + allocations:
        row["kept_share"] = _kept(l0, full, row["eval_loss"])
    return {"eval_loss": {"rank0": l0, "pilot": full}, "uniform": uniform, "allocations": allocations}


def _params(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(lora_params(r, *shapes[m]) for m, r in ranks.items())


def _kept(l0: float, full: float, loss: float) -> float | None:
    """(L₀ − L)/(L₀ − L_R): the share of the pilot's held-out decrease a candidate keeps (None: no decrease)."""
    dec = l0 - full
    return (l0 - loss) / dec if dec > 0 and math.isfinite(dec) else None


def run(
    model: nn.Module,
    targets: Sequence[str],
    head: Sequence[str],
    task: str,
    loss_fn: Any,
    train_items: Sequence[dict[str, Any]],
    collate: Any,
    eval_batches: Sequence[dict[str, torch.Tensor]],
    stats: dict[str, ModuleStats],
    shapes: dict[str, tuple[int, int]],
    settings: PilotSettings,
    z: float,
    rank_grid: Sequence[int],
    progress: bool = False,
) -> dict[str, Any]:
    """The pilot unit: train, whiten, measure every candidate (``units/pilot.json``, ``docs/schemas.md``)."""
    from ..engine.quantization import mean_loss
    from ..engine.tasks import loss_weight

    t0 = time.perf_counter()
    rank = min(settings.rank, *(min(s) for s in shapes.values()))
    st = PilotSettings(**{**asdict(settings), "rank": rank})
    pm, losses = train_pilot(model, targets, head, task, loss_fn, train_items, collate, st, progress)
    t1 = time.perf_counter()
    device = next(pm.parameters()).device
    ev = [batch_to(b, device) for b in eval_batches]
    weights = [loss_weight(b) for b in ev]
    whitened, damping = whitened_updates(updates(pm, targets), stats, z)
    res = measure(
        pm, targets, whitened, shapes, lambda m: mean_loss(m.get_base_model(), loss_fn, ev, weights), rank_grid, rank
    )
    tail = max(1, len(losses) // 10)
    res.update(
        {
            "settings": asdict(st),
            "train_loss": {"first": float(np.mean(losses[:tail])), "last": float(np.mean(losses[-tail:]))},
            "damping": damping,
            "modules": {
                m: {
                    "singular_values": w.S.tolist(),
                    "value": w.value,
                    "energy_share": {str(r): w.energy_share(r) for r in rank_grid if r <= rank},
                }
                for m, w in whitened.items()
            },
            "train_seconds": t1 - t0,
            "seconds": time.perf_counter() - t0,
        }
    )
    del pm
    return res
