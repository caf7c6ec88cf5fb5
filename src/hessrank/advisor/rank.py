"""LoRA rank per module from an analysis: two estimators and a budgeted allocation.

Inputs are ``analysis.json``-shaped data (numbers only), so everything here can be tested on synthetic spectra
with known answers.

**Spectral (parameter-counting) estimator.** A rank-r update of an m × n matrix has r(m + n − r) degrees of
freedom (the dimension of the manifold of rank-r matrices). If the loss has N_eff well-determined directions in
the module's weight space (MacKay's effective dimension, :mod:`hessrank.engine.spectrum`), an adapter needs at least
N_eff degrees of freedom to reach them, so r_spec = min{r : r(m + n − r) ≥ N_eff}. It is a *lower bound*: it
counts directions but ignores whether a rank-r matrix can align with them.

**Newton-step estimator.** The damped Newton step restricted to the top-k eigenvectors,
Δ(z) = −Σᵢ gᵢ/(λᵢ⁺ + z) vᵢ, is the update the quadratic model asks for; reshaped to the module's (m × n) weight,
its numerical rank is the rank the update needs. Two readings, both from ``analysis.json``:

* *energy rank*: the smallest r whose top-r singular values hold a share p of ‖Δ|ₘ‖²_F;
* *curve rank*: the smallest r at which the predicted loss change of the rank-r truncation reaches a share p of
  the full-rank change — the knee of the predicted loss-vs-rank curve (which the validation ladder measures).

Each top eigenvector of a linear layer is close to a rank-1 matrix (K-FAC: H ≈ A ⊗ G has eigenvectors
a ⊗ g), so the Newton-step rank is roughly the number of curvature directions the gradient excites: small
for simple tasks, larger when many directions carry both curvature and gradient.

**Budgeted allocation (water-filling).** Given a budget of trainable parameters, ranks are distributed by
marginal predicted gain per parameter (r(m + n) parameters per rank-r LoRA adapter, A: r × n, B: m × r): the
budget goes, step by step, to the module whose next rank step buys the most predicted decrease per parameter.
Modules analysed in one shared scope (joint or group) are combined in that scope's quadratic model *with its
cross terms*: with bᵢᵐ(r) the coordinate of module m's rank-r truncated step along eigenvector i,
q(r₁..r_M) = Σᵢ gᵢBᵢ + ½ Σᵢ λᵢBᵢ², Bᵢ = Σₘ bᵢᵐ(rₘ); modules from separate scopes add. The greedy rule is the
standard heuristic for this (a multiple-choice knapsack); it is not guaranteed optimal when steps are coarse
relative to the budget.

The grid, the parameter count and the separable allocation live in :mod:`hessrank.engine.lowrank` (the analysis
uses them too); they are re-exported here under the same names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.lowrank import RANK_GRID, ModuleCurve, lora_params
from ..engine.lowrank import _hull_from as _hull_from
from ..engine.lowrank import separable_allocation as separable_allocation
from ..errors import HessrankError
from ..results import RepeatResult

#: lora_alpha of rank-stabilised scaling (``use_rslora``): the adapter's output is scaled by α/√r (Kalajdzievski
#: 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732). Under Adam every
#: entry of B moves by about the learning rate per step, so the update ΔW = s·B·A grows like s·√r: with the common
#: α = 2r (s = 2) a larger rank *learns faster* at the same learning rate, and a rank ladder measures learning speed
#: as much as capacity. With s = α/√r the update's size no longer depends on r. α = 8 makes every rank move as fast
#: as the folk recipe r = 16, α = 32 (2·√16 = 8; also PEFT's default lora_alpha): that recipe is unchanged at r = 16.
#: The advice is trained and validated with this scaling, so its small ranks learn as fast as the ladder's large ones.
RSLORA_ALPHA = 8


def dof_rank_r(rank: int, m: int, n: int) -> int:
    """Dimension of the manifold of m × n matrices of rank r: r(m + n − r)."""
    return rank * (m + n - rank)


def snap_to_grid(rank: float, m: int, n: int, grid: Sequence[int] = RANK_GRID) -> int:
    """The smallest grid rank ≥ ``rank``, clipped to [1, min(m, n)]."""
    full = min(m, n)
    for r in grid:
        if r >= rank - 1e-9:
            return min(r, full)
    return full


def spectral_rank(n_eff: float, m: int, n: int, grid: Sequence[int] = RANK_GRID) -> int:
    """min{r : r(m + n − r) ≥ N_eff} on the grid (at least 1)."""
    if n_eff <= 0:
        return 1
    full = min(m, n)
    # solve r² − (m+n) r + N_eff ≤ 0 for the smallest r
    disc = (m + n) ** 2 - 4 * n_eff
    r = full if disc < 0 else math.ceil(((m + n) - math.sqrt(disc)) / 2 - 1e-9)
    return snap_to_grid(max(r, 1), m, n, grid)


def curve_rank(ranks: Sequence[int], changes: Sequence[float], share: float = 0.9) -> int:
    """Smallest rank whose predicted change reaches ``share`` of the largest predicted decrease on the curve."""
    best = min(changes)
    if best >= 0:
        return int(ranks[0])
    for r, c in zip(ranks, changes):
        if c <= share * best:
            return int(r)
    return int(ranks[-1])


def _upper_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Upper concave hull of (cost, gain) points sorted by cost, starting at (0, 0)."""
    hull: list[tuple[int, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _hulls(curves: Sequence[ModuleCurve]) -> dict[str, list[tuple[int, float, int]]]:
    hulls: dict[str, list[tuple[int, float, int]]] = {}
    for c in curves:
        pts = [(0, 0.0)]
        best = 0.0
        for r, d in zip(c.ranks, c.decrease):
            best = max(best, d)  # a larger rank can always reproduce a smaller one
            pts.append((lora_params(r, c.out_features, c.in_features), best))
        hull = _upper_hull(pts)
        rank_of = {lora_params(r, c.out_features, c.in_features): r for r in c.ranks}
        hulls[c.name] = [(x, y, rank_of.get(x, 0)) for x, y in hull]
    return hulls


def water_fill(curves: Sequence[ModuleCurve], param_budget: int) -> dict[str, int]:
    """Ranks per module (0 = no adapter) maximising Σ predicted decrease under Σ r(m+n) ≤ ``param_budget``."""
    if param_budget < 0:
        raise ValueError(f"parameter budget must be >= 0, got {param_budget}")
    hulls = _hulls(curves)
    pos = {name: 0 for name in hulls}
    spent = 0
    while True:
        best_name, best_ratio, best_cost = None, 0.0, 0
        for name, hull in hulls.items():
            i = pos[name]
            if i + 1 >= len(hull):
                continue
            dx = hull[i + 1][0] - hull[i][0]
            dy = hull[i + 1][1] - hull[i][1]
            if dy <= 0 or spent + dx > param_budget:
                continue
            ratio = dy / dx
            if ratio > best_ratio:
                best_name, best_ratio, best_cost = name, ratio, dx
        if best_name is None:
            break
        pos[best_name] += 1
        spent += best_cost
    return {name: hulls[name][pos[name]][2] for name in hulls}


def newton_curve(name: str, out_features: int, in_features: int, newton_module: dict[str, Any]) -> ModuleCurve:
    """A module's Newton curve from its ``newton[z].per_module[module]`` entry (predicted decrease = −change)."""
    c = newton_module["curve"]
    return ModuleCurve(
        name, int(out_features), int(in_features), tuple(c["ranks"]), tuple(-float(x) for x in c["predicted_change"])
    )


def module_curves_from_analysis(
    scope_repeat: RepeatResult | dict[str, Any],
    z_key: str,
    shapes: dict[str, Sequence[int]],
    modules: Sequence[str] | None = None,
) -> list[ModuleCurve]:
    """Newton curves of one scope result (``analysis.json`` → scopes[i].repeats[j], typed or as parsed) at damping
    ``z_key``: of ``modules`` (default: every module the unit has Newton data for), in that order."""
    newton = scope_repeat.newton if isinstance(scope_repeat, RepeatResult) else scope_repeat["newton"]
    per = (newton or {})[z_key]["per_module"]
    names = list(per) if modules is None else list(modules)
    missing = [m for m in names if m not in per]
    if missing:
        raise HessrankError(f"analysis has no Newton-step data for module '{missing[0]}'")
    return [newton_curve(m, shapes[m][0], shapes[m][1], per[m]) for m in names]


def share_allocation(curves: Sequence[ModuleCurve], share: float) -> tuple[dict[str, int], int, float]:
    """The cheapest allocation (greedy by gain per parameter) whose predicted decrease reaches ``share`` of the
    decrease with every module at full rank. Returns (ranks, parameters, share reached).

    This is water-filling with the budget chosen by the target share instead of given: the fewest trainable
    parameters that buy ``share`` of what the quadratic model says adapters can buy.
    """
    hulls = _hulls(curves)
    total = sum(h[-1][1] for h in hulls.values())
    pos = {name: 0 for name in hulls}
    spent, gained = 0, 0.0
    while total > 0 and gained < share * total - 1e-15:
        best_name, best_ratio = None, -1.0
        for name, hull in hulls.items():
            i = pos[name]
            if i + 1 >= len(hull):
                continue
            dx = hull[i + 1][0] - hull[i][0]
            dy = hull[i + 1][1] - hull[i][1]
            if dy > 0 and dy / dx > best_ratio:
                best_name, best_ratio = name, dy / dx
        if best_name is None:
            break
        i = pos[best_name]
        spent += hulls[best_name][i + 1][0] - hulls[best_name][i][0]
        gained += hulls[best_name][i + 1][1] - hulls[best_name][i][1]
        pos[best_name] = i + 1
    return {name: hulls[name][pos[name]][2] for name in hulls}, spent, (gained / total if total > 0 else 1.0)


def uniform_curve(curves: Sequence[ModuleCurve], grid: Sequence[int]) -> list[float]:
    """Σ over modules of the predicted decrease when every module gets rank r (capped at its full rank)."""
    return [sum(gain_at(c, r) for c in curves) for r in grid]


def gain_at(c: ModuleCurve, r: int) -> float:
    """A module's predicted decrease at rank r: the best listed rank ≤ r (0 for r = 0)."""
    best = 0.0
    for rr, d in zip(c.ranks, c.decrease):
        if rr <= r:
            best = max(best, d)
    return best


@dataclass(frozen=True)
class ScopeModel:
    """The quadratic model of one shared scope: top eigenvalues λ and gradient projections g."""

    eigenvalues: tuple[float, ...]
    projections: tuple[float, ...]


@dataclass(frozen=True)
class JointCurve:
    """A module's candidate ranks with its coordinates bᵢ(r) in its scope's eigenbasis."""

    name: str
    out_features: int
    in_features: int
    scope: str
    ranks: tuple[int, ...]
    coords: tuple[tuple[float, ...], ...]


def allocate(
    curves: Sequence[JointCurve],
    scopes: dict[str, ScopeModel],
    *,
    param_budget: int | None = None,
    share: float | None = None,
) -> tuple[dict[str, int], int, float]:
    """Greedy allocation on the joint quadratic models (cross terms included).

    Stops when the predicted decrease reaches ``share`` of the decrease with every module at full rank, or when
    no further step fits ``param_budget``. Returns (ranks, parameters spent, share of the full decrease reached).
    """
    import numpy as np

    if (param_budget is None) == (share is None):
        raise ValueError("give exactly one of param_budget and share")
    lam = {k: np.clip(np.asarray(v.eigenvalues, dtype=np.float64), None, None) for k, v in scopes.items()}
    g = {k: np.asarray(v.projections, dtype=np.float64) for k, v in scopes.items()}

    def q(scope: str, B: np.ndarray) -> np.ndarray:
        return B @ g[scope] + 0.5 * (B**2) @ lam[scope]

    B = {k: np.zeros(len(v.eigenvalues)) for k, v in scopes.items()}
    C = {c.name: np.asarray(c.coords, dtype=np.float64) for c in curves}
    pos = {c.name: -1 for c in curves}
    full = {k: np.zeros(len(v.eigenvalues)) for k, v in scopes.items()}
    for c in curves:
        full[c.scope] = full[c.scope] + C[c.name][-1]
    total = -sum(float(q(k, full[k][None, :])[0]) for k in scopes)
    spent, gained = 0, 0.0
    cost = {c.name: [lora_params(r, c.out_features, c.in_features) for r in c.ranks] for c in curves}
    while True:
        if share is not None and (total <= 0 or gained >= share * total - 1e-15):
            break
        best: tuple[float, str, int, float, int] | None = None
        for c in curves:
            i = pos[c.name]
            cur = C[c.name][i] if i >= 0 else 0.0
            cands = C[c.name][i + 1 :] - cur
            if len(cands) == 0:
                continue
            base = float(q(c.scope, B[c.scope][None, :])[0])
            dgain = base - q(c.scope, B[c.scope][None, :] + cands)
            dcost = np.asarray(cost[c.name][i + 1 :]) - (cost[c.name][i] if i >= 0 else 0)
            for j in range(len(cands)):
                if dgain[j] <= 0 or (param_budget is not None and spent + dcost[j] > param_budget):
                    continue
                ratio = dgain[j] / dcost[j]
                if best is None or ratio > best[0]:
                    best = (ratio, c.name, i + 1 + j, float(dgain[j]), int(dcost[j]))
        if best is None:
            break
        _, name, j, dg, dc = best
        c = next(cc for cc in curves if cc.name == name)
        i = pos[name]
        B[c.scope] = B[c.scope] + C[name][j] - (C[name][i] if i >= 0 else 0.0)
        pos[name] = j
        spent += dc
        gained += dg
    ranks = {c.name: (c.ranks[pos[c.name]] if pos[c.name] >= 0 else 0) for c in curves}
    return ranks, spent, (gained / total if total > 0 else 1.0)


def predicted_decrease(curves: Sequence[JointCurve], scopes: dict[str, ScopeModel], ranks: dict[str, int]) -> float:
    """−q of an allocation in the joint quadratic models (rank 0 = no adapter for a module)."""
    import numpy as np

    B = {k: np.zeros(len(v.eigenvalues)) for k, v in scopes.items()}
    for c in curves:
        r = ranks.get(c.name, 0)
        below = [i for i, rr in enumerate(c.ranks) if rr <= r]
        if r > 0 and below:
            B[c.scope] = B[c.scope] + np.asarray(c.coords[max(below)])
    total = 0.0
    for k, v in scopes.items():
        lam = np.asarray(v.eigenvalues)
        g = np.asarray(v.projections)
        total -= float(B[k] @ g + 0.5 * (B[k] ** 2) @ lam)
    return total
