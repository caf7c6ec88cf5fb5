"""Rank-curve arithmetic: the rank grid, LoRA parameter counts and the greedy allocation on module curves.

Pure numbers (no model, no analysis): the analysis measures its curves on :data:`RANK_GRID`, the pilot run and the
advisor (:mod:`hessrank.advisor.rank`, which re-exports these names) allocate ranks with
:func:`separable_allocation`.

* A rank-r LoRA adapter on an (m × n) weight (out × in) trains r(m + n) parameters: A (r × n) and B (m × r).
* A :class:`ModuleCurve` lists a module's predicted decrease d(r) ≥ 0 at grid ranks r. Made non-decreasing first
  (d̃(r) = max_{r' ≤ r} d(r'): a larger rank can reproduce a smaller one) and read as points (r(m + n), d̃(r)),
  its upper concave hull gives the rank steps worth taking.
* :func:`separable_allocation` assumes the modules' decreases add, D = Σ_m d̃_m(r_m): starting every module at its
  floor rank, it takes, one at a time, the hull step with the largest Δd/Δparameters, until D reaches a share p of
  Σ_m max_r d_m(r) or no step fits the parameter budget (the greedy rule for a multiple-choice knapsack).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: The rank grid advice is given on (the analysis measures its curves on the same grid, capped at full rank).
RANK_GRID: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def lora_params(rank: int, out_features: int, in_features: int) -> int:
    """Trainable parameters of a rank-r LoRA adapter on an (out × in) weight: A (r × in) and B (out × r)."""
    return rank * (in_features + out_features)


@dataclass(frozen=True)
class ModuleCurve:
    """A module's shape and predicted decrease −q(r) at grid ranks (decrease ≥ 0 is good)."""

    name: str
    out_features: int
    in_features: int
    ranks: tuple[int, ...]
    decrease: tuple[float, ...]


def _hull_from(c: ModuleCurve, floor: int) -> list[tuple[int, float, int]]:
    """Upper concave hull of (parameters, decrease, rank) for ranks >= ``floor``, starting at the floor's point
    (or at (0, 0) for floor 0). The decrease is made non-decreasing first (a larger rank can reproduce a smaller)."""
    best = 0.0
    running = []
    for r, d in zip(c.ranks, c.decrease):
        best = max(best, d)
        running.append((r, best))
    start = (0, 0.0, 0)
    pts = [(lora_params(r, c.out_features, c.in_features), g, r) for r, g in running if r >= floor]
    if floor > 0:
        first = next(((x, g, r) for x, g, r in pts), None)
        if first is None:
            return [(0, 0.0, 0)]
        start, pts = first, pts[1:]
    hull = [start]
    for p in pts:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        if p[1] > hull[-1][1]:  # a step that buys nothing is never taken
            hull.append(p)
    return hull


def separable_allocation(
    curves: Sequence[ModuleCurve],
    *,
    share: float | None = None,
    param_budget: int | None = None,
    floor: dict[str, int] | None = None,
) -> tuple[dict[str, int], int, float]:
    """Greedy allocation on separable module curves, each module starting at its ``floor`` rank (default 0).

    Every module first gets its floor (a rank-1 adapter by default in the advisor: no analysed module is left
    without one unless module selection says so); then rank steps go, one at a time, to the module whose next step
    on its concave hull buys the most predicted decrease per trainable parameter, until the decrease reaches
    ``share`` of Σ_m max_r decrease_m(r), or no step fits ``param_budget``. Returns (ranks, parameters, share
    reached). A budget smaller than the floors' cost is allocated without floors.
    """
    if (param_budget is None) == (share is None):
        raise ValueError("give exactly one of param_budget and share")
    fl = {c.name: int((floor or {}).get(c.name, 0)) for c in curves}
    hulls = {c.name: _hull_from(c, fl[c.name]) for c in curves}
    spent = sum(h[0][0] for h in hulls.values())
    if param_budget is not None and spent > param_budget:
        hulls = {c.name: _hull_from(c, 0) for c in curves}
        spent = 0
    total = sum(max([0.0, *c.decrease]) for c in curves)
    gained = sum(h[0][1] for h in hulls.values())
    pos = {name: 0 for name in hulls}
    while share is None or (total > 0 and gained < share * total - 1e-15):
        best: tuple[float, str] | None = None
        for name, hull in hulls.items():
            i = pos[name]
            if i + 1 >= len(hull):
                continue
            dx, dy = hull[i + 1][0] - hull[i][0], hull[i + 1][1] - hull[i][1]
            if dy <= 0 or dx <= 0 or (param_budget is not None and spent + dx > param_budget):
                continue
            if best is None or dy / dx > best[0]:
                best = (dy / dx, name)
        if best is None:
            break
        name = best[1]
        i = pos[name]
        spent += hulls[name][i + 1][0] - hulls[name][i][0]
        gained += hulls[name][i + 1][1] - hulls[name][i][1]
        pos[name] = i + 1
    ranks = {name: hulls[name][pos[name]][2] for name in hulls}
    return ranks, spent, (gained / total if total > 0 else 1.0)
