"""From ``analysis.json`` to ``recommendation.json`` and the configs other tools accept.

Reads only the analysis document (no model), so it is cheap and testable on synthetic spectra. Steps, each a
function below: per-module estimates (:func:`kfac_estimates`, :func:`newton_estimates`), module selection
(:func:`select_modules`), the rank allocation of the chosen estimator (:func:`allocate_ranks`), the bit width
(:mod:`hessrank.advisor.quant`), compensation of the quantization cost, the memory forecast
(:mod:`hessrank.advisor.memory`) and the document with its plain-language explanation.

**Estimators** (``--estimator``; every one is computed and reported under ``estimators``, one sets the ranks;
``auto``, the default, is the first of ``pilot``, ``kfac``, ``newton-topk`` the analysis has data for):

* ``pilot`` (opt-in: ``analyze --pilot-steps N``) — measured along a short training run
  (:mod:`hessrank.analysis.pilot`): a rank-R pilot LoRA is trained for a few steps, its update truncated in
  K-FAC-whitened coordinates to each uniform rank and to allocations keeping a share p of the whitened update energy,
  and each truncation's held-out loss measured. The advice is the cheapest measured candidate that keeps
  ``target_share`` of the pilot's held-out decrease. ``auto`` takes it when the analysis has one. Not the default, by
  measurement (``reports/validation.md``, AG News): its advice (63,748 parameters) was as far from the ladder's best as
  the K-FAC advice (23,812; 2.7% vs 2.8% paired) and the 100-step pilot doubled the analysis (85 → 183 s, 12.7% of the
  ladder).
* ``kfac`` (default) — the whole-module K-FAC curves of :mod:`hessrank.engine.kfac`: per module the cross-fitted
  predicted decrease ΔL_m(r) = ½Σ_{l≤r} e_l of the best rank-r update, divided by the scale c fitted on the
  scope's top-k Lanczos pairs (loss units). Chosen by measurement (``reports/validation.md``): the top-k
  estimator's advice fell short of the best ladder rank in all four cases it was validated on.
* ``newton-topk`` — the damped Newton step restricted to the top-k eigen-subspace (the previous default), with the
  joint allocation of :func:`hessrank.advisor.rank.allocate` and a spectral (parameter-counting) floor.

**Allocation.** The cheapest allocation, by predicted decrease per trainable parameter on each module's concave
curve, whose decrease reaches ``target_share`` (``--share``; default 1 − tolerance = 98%) of Σ_m max_r ΔL_m(r);
every kept module starts at rank 1.
Under ``--param-budget`` / ``--memory-budget`` the budget is water-filled on the same curves. **Module selection**
(``--min-gain-fraction f``, default 0: every analysed module keeps at least rank 1): a module is left without an
adapter only when its predicted gain is below f × the best module's gain *and* that holds in both held-out halves
of the K-FAC batches (:attr:`hessrank.engine.kfac.RankCurve.gain_halves`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..engine.quantization import FORMAT_INFO
from ..errors import HessrankError
from ..io import atomic_write, write_json
from ..results import (
    AnalysisResult,
    ModuleAdvice,
    RepeatResult,
    ScopeResult,
    load_analysis_result,
    module_sources,
)
from . import quant as Q
from .export import write_configs
from .memory import Architecture, fmt_bytes, forecast
from .rank import (
    RSLORA_ALPHA,
    JointCurve,
    ModuleCurve,
    ScopeModel,
    allocate,
    curve_rank,
    gain_at,
    lora_params,
    module_curves_from_analysis,
    predicted_decrease,
    separable_allocation,
    snap_to_grid,
    spectral_rank,
    uniform_curve,
)

log = logging.getLogger(__name__)

SCHEMA = "hessrank.recommendation/1"
ESTIMATORS = ("pilot", "kfac", "newton-topk")


@dataclass(frozen=True)
class RecommendSettings:
    """Knobs of the advisor (all have documented defaults)."""

    tolerance: float = Q.DEFAULT_TOLERANCE  #: allowed quantization loss increase, share of the held-out loss
    param_budget: int | None = None
    memory_budget: int | None = None
    z: str = "0.01"  #: damping relative to the largest curvature (Newton step: λ_max; K-FAC: max λ(A⊗G))
    #: share of the predicted decrease the allocation must reach; None: 1 − tolerance (see ``target_share``)
    share: float | None = None
    estimator: str = "auto"  #: which estimator sets the ranks (all are reported); auto: see :func:`resolve_estimator`
    min_gain_fraction: float = 0.0  #: module selection threshold (0: every analysed module is adapted)
    batch_size: int | None = None  #: training batch for the memory forecast (default: the analysis batch)
    seq_len: int | None = None  #: training sequence length (default: the analysis max length)
    compute_dtype: str = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"

    @property
    def target_share(self) -> float:
        """The share of the predicted decrease the ranks must reach: ``share``, or by default 1 − ``tolerance``.

        The validation calls an advice right when its loss is within ``tolerance`` of the best rank's. Leaving at
        most a ``tolerance`` share of the achievable decrease on the table keeps the advice within that tolerance
        whenever the achievable decrease is no larger than the loss that remains after it (on MiniLM/SST-2 and AG News
        fine-tuning lowered the held-out loss by 37% and 45% of its starting value). The earlier fixed 0.9 left up to
        10% of the decrease: on AG News the K-FAC curve put 90% at rank 1, and rank 16 beat rank 1 by 5% of the loss
        (reports/validation.md).
        """
        return self.share if self.share is not None else 1.0 - self.tolerance

    def check(self) -> None:
        if not 0 < self.tolerance < 1:
            raise HessrankError(f"tolerance must be in (0, 1) (a share of the held-out loss), got {self.tolerance}")
        if self.param_budget is not None and self.param_budget < 1:
            raise HessrankError(f"parameter budget must be a positive number of parameters, got {self.param_budget}")
        if self.param_budget is not None and self.memory_budget is not None:
            raise HessrankError("give either --param-budget or --memory-budget, not both")
        if self.share is not None and not 0 < self.share <= 1:
            raise HessrankError(f"share must be in (0, 1], got {self.share}")
        if self.estimator not in ("auto", *ESTIMATORS):
            raise HessrankError(f"estimator '{self.estimator}' is not one of auto, {', '.join(ESTIMATORS)}")
        if not 0 <= self.min_gain_fraction < 1:
            raise HessrankError(f"min-gain-fraction must be in [0, 1), got {self.min_gain_fraction}")


@dataclass
class ModuleDraft:
    """One module's advice while the advisor builds it (mutable); :meth:`freeze` gives the typed
    :class:`~hessrank.results.ModuleAdvice`, one entry of ``recommendation.json`` ``modules``."""

    shape: tuple[int, int]
    source_scope: str
    estimators: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] | None = None  #: the K-FAC curve in loss units (None without K-FAC data)
    pilot: dict[str, Any] | None = None  #: the pilot update's whitened value and kept share per rank (None: no pilot)
    predicted_decrease_full_rank: float = 0.0  #: the chosen estimator's largest predicted decrease
    curvature_share: float | None = None
    gain_share: float = 0.0
    selected: bool = True
    rank: int = 0
    rank_rule: str = ""
    alpha: float = 0  #: lora_alpha (every module: RSLORA_ALPHA, scaled by α/√r)
    reasons: list[str] = field(default_factory=list)
    compensation: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None

    def freeze(self) -> ModuleAdvice:
        """The typed, frozen advice (``compensation`` and ``quantization`` are left out while None)."""
        return ModuleAdvice(
            shape=tuple(self.shape),
            source_scope=self.source_scope,
            estimators=self.estimators,
            predicted_decrease=self.predicted,
            pilot=self.pilot,
            predicted_decrease_full_rank=self.predicted_decrease_full_rank,
            curvature_share=self.curvature_share,
            gain_share=self.gain_share,
            selected=self.selected,
            rank=self.rank,
            rank_rule=self.rank_rule,
            alpha=self.alpha,
            reasons=tuple(self.reasons),
            compensation=self.compensation,
            quantization=self.quantization,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.freeze().to_dict()


def _as_analysis(doc: AnalysisResult | dict[str, Any]) -> AnalysisResult:
    return doc if isinstance(doc, AnalysisResult) else AnalysisResult.from_dict(doc)


#: λ_k/λ_1 above which the top-k estimator's ranks get ``confidence.level = "low"``. Chosen from the four real
#: cases of reports/validation.md (λ_k/λ_1 0.025, 0.088, 0.169, 0.426 with paired shortfalls of the top-k advice
#: against its best rung of 1.0%, 2.2%, 6.0% and 10.8%). Four points; a provisional threshold, not a fitted law.
FLAT_TOP_K = 0.1

#: Gain-weighted resolved share (:attr:`hessrank.engine.kfac.RankCurve.resolved_share`) below which the K-FAC ranks get
#: ``confidence.level = "low"``: most of the gradient signal then lies in directions the analysis batches cannot
#: resolve one by one, so a larger sample (``--kfac-batches``) may find more rank. Provisional.
LOW_RESOLVED_SHARE = 0.25


def top_k_confidence(doc: AnalysisResult | dict[str, Any], threshold: float = FLAT_TOP_K) -> dict[str, Any]:
    """How far each rank-bearing scope's top-k spectrum decayed: λ_k/λ_1 (repeat 0, positive part).

    ``doc``: the analysis, or a dict with its ``scopes`` (only they are read).

    The Newton-step rank and the joint allocation see only the top-k eigen-subspace. When λ_k is still a large
    fraction of λ_1 the spectrum has not flattened inside that subspace: directions beyond k carry curvature the
    top-k estimator cannot see, and its ranks are then best read as lower bounds (measured: reports/validation.md).
    """
    scopes = doc.scopes if isinstance(doc, AnalysisResult) else tuple(ScopeResult.from_dict(s) for s in doc["scopes"])
    ratios: dict[str, float] = {}
    k = 0
    for scope, rep in module_sources(scopes).values():
        if scope.name in ratios:
            continue
        lam = np.sort(np.asarray(rep.eigenvalues, dtype=np.float64))[::-1]
        if rep.num_params is not None and lam.size >= int(rep.num_params):
            continue  # the whole spectrum is known: nothing lies beyond the top-k
        if lam.size and lam[0] > 0:
            ratios[scope.name] = float(max(lam[-1], 0.0) / lam[0])
            k = max(k, int(lam.size))
    worst = max(ratios.values()) if ratios else None
    low = worst is not None and worst > threshold
    note = (
        f"λ_k/λ_1 = {worst:.3g} > {threshold:g}: the top-{k} spectrum is still flat, so the top-k ranks are "
        "likely lower bounds (both measured cases above this ratio fell short by 6–11%); analyze with a larger "
        "--top-k, or validate with more steps and a ladder beyond 4r"
        if low
        else (f"λ_k/λ_1 = {worst:.3g} ≤ {threshold:g}" if worst is not None else "no positive top eigenvalue")
    )
    return {"level": "low" if low else "normal", "top_k_ratio": ratios, "threshold": threshold, "note": note}


def kfac_confidence(kf: dict[str, dict[str, Any]], threshold: float = LOW_RESOLVED_SHARE) -> dict[str, Any]:
    """Gain-weighted share of each module's unbiased full-rank signal that the K-FAC curve resolves."""
    tot = sum(max(v["total"], 0.0) for v in kf.values())
    peak = sum(v["peak"] for v in kf.values())
    share = peak / tot if tot > 0 else None
    low = share is not None and share < threshold
    note = (
        f"the rank curves resolve {share:.0%} of the modules' unbiased full-rank gradient signal (< {threshold:.0%}): "
        "most of it lies in directions the analysis batches cannot resolve one by one; analyze with more "
        "--kfac-batches, or validate with a ladder beyond 4r"
        if low
        else (f"the rank curves resolve {share:.0%} of the unbiased full-rank signal" if share is not None else "")
    )
    return {"level": "low" if low else "normal", "resolved_share": share, "threshold": threshold, "note": note}


#: The pilot's training loss must fall by at least this share of its start for its update to say much.
PILOT_MIN_TRAIN_DECREASE = 0.05


def pilot_confidence(pd: dict[str, Any], threshold: float = PILOT_MIN_TRAIN_DECREASE) -> dict[str, Any]:
    """Low when the pilot barely trained, or when its largest truncation did not keep its decrease."""
    tl = pd["train_loss"]
    fell = (tl["first"] - tl["last"]) / tl["first"] if tl["first"] > 0 else 0.0
    el = pd["eval_loss"]
    held = el["rank0"] - el["pilot"]
    low = fell < threshold or not held > 0
    note = (
        f"the pilot's training loss fell {fell:.0%} ({tl['first']:.4f} -> {tl['last']:.4f}) and its held-out loss "
        f"{el['rank0']:.4f} -> {el['pilot']:.4f}"
        + (
            f": too little for its truncations to tell ranks apart (< {threshold:.0%} or no held-out decrease); "
            "analyze with more --pilot-steps or a larger --pilot-lr"
            if low
            else ""
        )
        + "; the pilot sees the first part of training only: validate to check the plateau"
    )
    return {"level": "low" if low else "normal", "train_loss_decrease": fell, "threshold": threshold, "note": note}


def _module_n_eff(scope: ScopeResult, rep: RepeatResult, module: str, z_rel: float) -> dict[str, float | None]:
    """N_eff of a module: its own scope's (top-k and SLQ), or Σᵢ λᵢ/(λᵢ+z)·massᵢ,ₘ from a shared scope."""
    key = f"{z_rel:g}"
    if scope.kind == "module":
        ed = rep.effective_dimension or {}
        slq = ed.get("n_eff_relative_slq") or {}
        return {"topk": ed["n_eff_relative_topk"][key], "slq": slq.get(key)}
    lam = np.clip(np.asarray(rep.eigenvalues), 0, None)
    z = z_rel * float(lam.max()) if lam.max() > 0 else z_rel
    mass = np.asarray((rep.module_mass or {})[module])
    return {"topk": float(np.sum(lam / (lam + z) * mass)), "slq": None}


# ----------------------------------------------------------------------------------------------------------
# estimates
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Estimates:
    """Per-module curves of every estimator, with what the allocations need."""

    advice: dict[str, ModuleDraft]
    newton: list[ModuleCurve]
    joint: list[JointCurve]
    scope_models: dict[str, ScopeModel]
    kfac: list[ModuleCurve] | None  #: loss units (calibrated); None when the analysis has no K-FAC curves
    kfac_info: dict[str, dict[str, Any]]
    calibration: dict[str, Any]
    pilot: list[ModuleCurve] | None = None  #: whitened pilot-update value kept at each rank (loss units)
    pilot_doc: dict[str, Any] | None = None  #: ``analysis.json`` ``pilot`` (the measured candidates)


def newton_estimates(an: AnalysisResult, st: RecommendSettings) -> Estimates:
    """The top-k estimators of every module (Newton curve and energy rank, spectral floor) and their curves."""
    zkey = st.z
    if zkey not in {f"{c:g}" for c in an.newton_z}:
        raise HessrankError(f"z '{zkey}' was not analysed; analysed: {', '.join(f'{c:g}' for c in an.newton_z)}")
    sources = an.module_sources()
    shapes = an.module_shapes
    advice: dict[str, ModuleDraft] = {}
    curves, jcurves, scope_models = [], [], {}
    for m, (o, i) in shapes.items():
        scope, rep = sources[m]
        nd = rep.newton_module(zkey, m)
        if nd is None:
            raise HessrankError(f"analysis has no Newton-step data for module '{m}'")
        c = module_curves_from_analysis(rep, zkey, shapes, modules=[m])[0]
        curves.append(c)
        if "coords" in nd["curve"]:
            coords = tuple(tuple(x) for x in nd["curve"]["coords"])
            jcurves.append(JointCurve(m, o, i, scope.name, tuple(nd["curve"]["ranks"]), coords))
            if rep.grad_projections is None:
                raise HessrankError(
                    f"analysis scope '{scope.name}' has no grad_projections (needed by its joint curves)"
                )
            scope_models[scope.name] = ScopeModel(tuple(rep.eigenvalues), tuple(rep.grad_projections))
        ne = _module_n_eff(scope, rep, m, float(zkey))
        spec_topk = spectral_rank(ne["topk"] or 0.0, o, i)
        spec_slq = spectral_rank(ne["slq"], o, i) if ne["slq"] is not None else None
        advice[m] = ModuleDraft(
            shape=(o, i),
            source_scope=scope.name,
            estimators={
                "n_eff_topk": ne["topk"],
                "n_eff_slq": ne["slq"],
                "spectral": spec_slq if spec_slq is not None else spec_topk,
                "spectral_topk": spec_topk,
                "newton_curve": snap_to_grid(
                    curve_rank(nd["curve"]["ranks"], nd["curve"]["predicted_change"], st.target_share), o, i
                ),
                "newton_energy": snap_to_grid(nd["energy_rank"]["0.9"], o, i),
            },
            curvature_share=(rep.module_curvature_share or {}).get(m, 0.0) if scope.kind != "module" else None,
        )
    kfac, info, cal = kfac_estimates(an, st, sources)
    return Estimates(advice, curves, jcurves, scope_models, kfac, info, cal, *pilot_estimates(an, cal, sources))


def pilot_usable(pd: dict[str, Any] | None) -> str | None:
    """None when the pilot's truncations can set ranks; else why not (its held-out loss did not fall)."""
    if not pd:
        return "the analysis has no pilot run (--pilot-steps 0, or it predates pilots)"
    el = pd["eval_loss"]
    if not el["rank0"] - el["pilot"] > 0:
        return (
            f"the pilot run did not lower the held-out loss (rank 0 {el['rank0']:.4g}, pilot {el['pilot']:.4g}), so "
            "its truncations cannot tell ranks apart; analyze with more --pilot-steps or another --pilot-lr"
        )
    return None


def resolve_estimator(an: AnalysisResult, name: str) -> tuple[str, str | None]:
    """(estimator, why ``auto`` passed over the pilot or None). ``auto``: ``pilot`` when the analysis ran a pilot that
    lowered the held-out loss, else ``kfac`` when it has K-FAC curves, else ``newton-topk``."""
    if name != "auto":
        return name, None
    why = pilot_usable(an.pilot)
    if why is None:
        return "pilot", None
    fallback = "kfac" if an.kfac else "newton-topk"
    return fallback, (f"{why}; the ranks come from the {fallback} estimator" if an.pilot else None)


def pilot_estimates(
    an: AnalysisResult, cal: dict[str, Any], sources: dict[str, tuple[ScopeResult, RepeatResult]]
) -> tuple[list[ModuleCurve] | None, dict[str, Any] | None]:
    """Per module, c·½Σ_{l≤r}s_l² of the whitened pilot update (loss units, c the source scope's K-FAC scale)."""
    pd = an.pilot
    if not pd:
        return None, None
    curves = []
    shapes = an.module_shapes
    for m, d in pd["modules"].items():
        c = (cal.get(sources[m][0].name) or {}).get("scale") or 1.0
        o, i = shapes[m]
        ranks = tuple(sorted(int(r) for r in d["energy_share"]))
        curves.append(ModuleCurve(m, o, i, ranks, tuple(c * d["value"] * d["energy_share"][str(r)] for r in ranks)))
    return curves, pd


def kfac_estimates(
    an: AnalysisResult, st: RecommendSettings, sources: dict[str, tuple[ScopeResult, RepeatResult]]
) -> tuple[list[ModuleCurve] | None, dict[str, dict[str, Any]], dict[str, Any]]:
    """K-FAC curves in loss units: ΔL_m(r)/c with c the scale of the module's source scope (1 if uncalibrated)."""
    kd = an.kfac
    if not kd:
        return None, {}, {}
    if st.z not in kd["per_z"]:
        raise HessrankError(f"z '{st.z}' has no K-FAC curves; analysed: {', '.join(kd['per_z'])}")
    cal = kd.get("calibration") or {}
    curves, info = [], {}
    shapes = an.module_shapes
    for m, d in kd["per_z"][st.z]["modules"].items():
        scope = sources[m][0].name
        c = (cal.get(scope) or {}).get("scale") or 1.0
        o, i = shapes[m]
        dec = tuple(float(x) / c for x in d["decrease"])
        curves.append(ModuleCurve(m, o, i, tuple(int(r) for r in d["ranks"]), dec))
        info[m] = {
            "ranks": list(d["ranks"]),
            "decrease": list(dec),
            "peak": float(d["peak"]) / c,
            "total": float(d["total"]) / c,
            "in_sample": float(d["in_sample"]) / c,
            "gain_halves": [float(x) / c for x in d["gain_halves"]],
            "resolved_share": d["resolved_share"],
            "scale": c,
            "calibrated": scope in cal and cal[scope].get("scale") is not None,
        }
    return curves, info, cal


def select_modules(info: dict[str, dict[str, Any]], fraction: float) -> dict[str, str | None]:
    """Module selection: {module: reason it gets no adapter, or None when kept}.

    Dropped only when the module's gain is below ``fraction`` × the best module's gain in the full curve *and*
    in each held-out half (:attr:`hessrank.engine.kfac.RankCurve.gain_halves`), so one noisy batch set cannot drop it.
    """
    if fraction <= 0 or not info:
        return {m: None for m in info}
    best = max(v["peak"] for v in info.values())
    best_h = [max(v["gain_halves"][h] for v in info.values()) for h in (0, 1)]
    out: dict[str, str | None] = {}
    for m, v in info.items():
        low = v["peak"] < fraction * best and all(v["gain_halves"][h] < fraction * best_h[h] for h in (0, 1))
        out[m] = (
            f"no adapter: predicted gain {v['peak']:.3g} is below {fraction:g} x the best module's {best:.3g}, "
            f"in both held-out halves too ({v['gain_halves'][0]:.3g}, {v['gain_halves'][1]:.3g})"
            if low
            else None
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# allocations
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """Ranks per module from one estimator, with the parameters they cost and the share of the decrease reached."""

    estimator: str
    ranks: dict[str, int]
    params: int
    share_reached: float
    global_rank: int
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks,
            "lora_parameters": self.params,
            "share_reached": self.share_reached,
            "global_rank": self.global_rank,
            "note": self.note,
        }


def _global_rank(curves: list[ModuleCurve], share: float) -> tuple[int, list[int], list[float]]:
    grid = sorted({r for c in curves for r in c.ranks})
    uni = uniform_curve(curves, grid)
    g = curve_rank(grid, [-u for u in uni], share) if uni and max(uni) > 0 else 1
    return g, grid, uni


def kfac_allocation(
    est: Estimates, st: RecommendSettings, keep: dict[str, str | None], budget: int | None
) -> Allocation:
    """The K-FAC allocation: floors of rank 1 on kept modules, greedy by gain per parameter (separable curves)."""
    assert est.kfac is not None
    kept = [c for c in est.kfac if keep.get(c.name) is None]
    if not kept:
        raise HessrankError("module selection left no module to adapt; lower --min-gain-fraction")
    floor = {c.name: 1 for c in kept}
    if budget is None:
        ranks, params, reached = separable_allocation(kept, share=st.target_share, floor=floor)
    else:
        ranks, params, reached = separable_allocation(kept, param_budget=budget, floor=floor)
    ranks = {**{c.name: 0 for c in est.kfac}, **ranks}
    g, _, _ = _global_rank(kept, st.target_share)
    note = (
        f"the cheapest allocation by predicted gain per parameter (whole-module K-FAC curves, separable) reaching "
        f"{st.target_share:.0%} of the predicted decrease, every kept module starting at rank 1, reaches "
        f"{reached:.1%} "
        f"with {params:,} LoRA parameters"
        if budget is None
        else f"the K-FAC curves water-filled into {budget:,} trainable parameters reach {reached:.1%}"
    )
    return Allocation("kfac", ranks, params, reached, g, note)


def pilot_allocation(
    est: Estimates, st: RecommendSettings, keep: dict[str, str | None], budget: int | None
) -> Allocation:
    """The cheapest measured candidate keeping ``target_share`` of the pilot's held-out decrease; under a budget,
    the whitened pilot curves water-filled (the measured candidates do not cover every budget)."""
    assert est.pilot is not None and est.pilot_doc is not None
    pd = est.pilot_doc
    names = [c.name for c in est.pilot]
    uni = [u for u in pd["uniform"] if u.get("kept_share") is not None]
    g = min((u["rank"] for u in uni if u["kept_share"] >= st.target_share), default=pd["settings"]["rank"])
    if budget is not None:
        kept = [c for c in est.pilot if keep.get(c.name) is None] or est.pilot
        ranks, params, reached = separable_allocation(kept, param_budget=budget, floor={c.name: 1 for c in kept})
        note = f"the whitened pilot-update curves water-filled into {budget:,} trainable parameters keep {reached:.1%}"
        return Allocation("pilot", {**{m: 0 for m in names}, **ranks}, params, reached, g, note)
    rows = [dict(r, kind=f"uniform rank {r['rank']}") for r in pd["uniform"]] + [
        dict(r, kind=f"allocation keeping {r['share']:.0%} of the whitened update") for r in pd["allocations"]
    ]
    rows = [r for r in rows if r.get("kept_share") is not None]
    why = pilot_usable(pd)
    if why is not None or not rows:
        raise HessrankError(f"estimator pilot: {why}; pass --estimator kfac")
    ok = [r for r in rows if r["kept_share"] >= st.target_share]
    best = min(ok, key=lambda r: (r["params"], r["eval_loss"])) if ok else min(rows, key=lambda r: r["eval_loss"])
    ranks = {m: int(best["ranks"].get(m, 0)) if keep.get(m) is None else 0 for m in names}
    el = pd["eval_loss"]
    note = (
        f"the cheapest truncation of the pilot run (rank {pd['settings']['rank']}, {pd['settings']['steps']} steps) "
        f"that keeps {st.target_share:.0%} of its held-out decrease ({el['rank0']:.4f} -> {el['pilot']:.4f}): "
        f"{best['kind']}, measured {best['eval_loss']:.4f} ({best['kept_share']:.1%} kept) with "
        f"{best['params']:,} LoRA parameters"
        + ("" if ok else f"; no candidate kept {st.target_share:.0%}, so the one with the lowest loss")
    )
    return Allocation("pilot", ranks, int(best["params"]), float(best["kept_share"]), int(g), note)


def newton_allocation(est: Estimates, st: RecommendSettings, budget: int | None) -> Allocation:
    """The top-k allocation (joint quadratic model when eigen-coordinates exist), with the spectral floor."""
    joint = len(est.joint) == len(est.newton)
    if budget is None:
        if joint:
            ranks, params, reached = allocate(est.joint, est.scope_models, share=st.target_share)
        else:
            ranks, params, reached = separable_allocation(est.newton, share=st.target_share)
        for m, r in ranks.items():
            spec = est.advice[m].estimators["spectral"]
            if 0 < r < spec:
                ranks[m] = spec
    elif joint:
        ranks, params, reached = allocate(est.joint, est.scope_models, param_budget=budget)
    else:
        ranks, params, reached = separable_allocation(est.newton, param_budget=budget)
    g, _, _ = _global_rank(est.newton, st.target_share)
    note = (
        "the cheapest allocation by predicted gain per parameter in the top-k Newton model reaching "
        f"{st.target_share:.0%} "
        f"of the full-rank predicted decrease reaches {reached:.1%} with {params:,} LoRA parameters"
        + (" (joint quadratic model, cross terms included)" if joint else " (modules treated as separable)")
        + "; each adapted module keeps at least its spectral (parameter-counting) rank"
    )
    return Allocation("newton-topk", ranks, params, reached, g, note)


def allocate_ranks(
    est: Estimates, st: RecommendSettings, keep: dict[str, str | None], budget: int | None = None
) -> dict[str, Allocation]:
    """Every estimator's allocation (K-FAC only when the analysis has its curves)."""
    out = {"newton-topk": newton_allocation(est, st, budget)}
    if est.kfac is not None:
        out["kfac"] = kfac_allocation(est, st, keep, budget)
    if est.pilot is not None and (st.estimator == "pilot" or pilot_usable(est.pilot_doc) is None):
        out["pilot"] = pilot_allocation(est, st, keep, budget)
    if st.estimator not in out:
        raise HessrankError(
            f"estimator '{st.estimator}' needs data this analysis lacks (no "
            + (
                "pilot run: analyzed with --pilot-steps 0 or before pilots"
                if st.estimator == "pilot"
                else "K-FAC curves: it predates them"
            )
            + "); rerun hessrank analyze, or pass another --estimator"
        )
    return out


def decrease_of(est: Estimates, estimator: str, ranks: dict[str, int]) -> float:
    """Predicted decrease of an allocation under an estimator's model."""
    if estimator == "kfac" and est.kfac is not None:
        return sum(gain_at(c, ranks.get(c.name, 0)) for c in est.kfac)
    if estimator == "pilot" and est.pilot is not None:
        return sum(gain_at(c, ranks.get(c.name, 0)) for c in est.pilot)
    if len(est.joint) == len(est.newton):
        return predicted_decrease(est.joint, est.scope_models, ranks)
    return sum(gain_at(c, ranks.get(c.name, 0)) for c in est.newton)


# ----------------------------------------------------------------------------------------------------------
# bit width and memory
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What the memory forecast needs, read once from the analysis document and the settings."""

    arch: Architecture
    shapes: dict[str, tuple[int, int]]
    heads: list[str]
    batch: int
    seq: int
    head_params: int
    st: RecommendSettings

    @classmethod
    def of(cls, an: AnalysisResult, st: RecommendSettings) -> _Context:
        return cls(
            Architecture.from_dict(an.architecture),
            an.module_shapes,
            [an.analysis_point["head"]] if an.analysis_point.get("head") else [],
            st.batch_size or int(an.config["batch_size"]),
            st.seq_len or int(an.config["max_length"]),
            int(an.architecture.get("head_params", 0)),
            st,
        )

    def forecast(self, fmt: str, ranks: dict[str, int], skip: list[str]) -> Any:
        st = self.st
        return forecast(
            self.arch,
            fmt,
            ranks,
            self.shapes,
            self.batch,
            self.seq,
            st.compute_dtype,
            self.heads + skip,
            st.gradient_checkpointing,
            st.device,
            extra_trainable=self.head_params,
        )


def format_candidates(quant: dict[str, Any] | None, ctx: _Context, ranks: dict[str, int]) -> list[Q.FormatOption]:
    """Every loadable format with its measured loss increase, skip list and forecast memory at ``ranks``."""

    def mem(fmt: str, skip: list[str]) -> int:
        return ctx.forecast(fmt, ranks, [s for s in skip if s not in ctx.heads]).total

    if quant is not None:
        return Q.format_options(quant, ctx.st.tolerance, mem, ctx.heads)
    note = ["no quantization measured (run analyze with --quant-formats)"]
    return [Q.FormatOption("none", [], 0.0, None, None, mem("none", []), True, note)]


def fit_memory_budget(
    est: Estimates, ctx: _Context, keep: dict[str, str | None], options: list[Q.FormatOption]
) -> tuple[Q.FormatOption, dict[str, int], str]:
    """Under a memory budget: per format, water-fill what memory is left after the base model (16 bytes per
    trainable parameter: fp32 weight, gradient, two AdamW moments) and keep the (format, ranks) pair with the best
    predicted decrease minus quantization increase."""
    st = ctx.st
    assert st.memory_budget is not None
    zero = {m: 0 for m in ctx.shapes}
    best = None
    for opt in options:
        left = st.memory_budget - ctx.forecast(opt.format, zero, opt.skip_modules).total
        pb = int(left // 16)
        if pb <= 0:
            continue
        rk = allocate_ranks(est, st, keep, budget=pb)[st.estimator].ranks
        if not any(rk.values()):
            continue
        score = decrease_of(est, st.estimator, rk) - opt.loss_increase
        if best is None or score > best[0]:
            best = (score, opt, rk, pb)
    if best is None:
        smallest = min(ctx.forecast(o.format, zero, o.skip_modules).total for o in options)
        raise HessrankError(
            f"memory budget {fmt_bytes(st.memory_budget)} is below the forecast of the base "
            f"model alone ({fmt_bytes(smallest)}) in every format"
        )
    _, chosen, rk, pb = best
    for o in options:
        o.memory = ctx.forecast(o.format, rk, o.skip_modules).total
    note = (
        f"memory budget {fmt_bytes(st.memory_budget)}: {chosen.format} leaves room for {pb:,} "
        "trainable parameters, water-filled by predicted gain"
    )
    return chosen, rk, note


def _check_param_budget(budget: int, shapes: dict[str, tuple[int, int]]) -> None:
    smallest = min(lora_params(1, o, i) for o, i in shapes.values())
    if budget < smallest:
        raise HessrankError(
            f"parameter budget {budget:,} is below the smallest rank-1 adapter ({smallest:,} parameters)"
        )


def _apply(est: Estimates, alloc: Allocation, keep: dict[str, str | None], rule: str, st: RecommendSettings) -> None:
    """Write an allocation's ranks into the advice, with each module's rule and reasons."""
    curves = {"kfac": est.kfac, "pilot": est.pilot}.get(alloc.estimator) or est.newton
    gains = {c.name: max([0.0, *c.decrease]) for c in curves}
    total = sum(gains.values())
    for m, adv in est.advice.items():
        adv.predicted_decrease_full_rank = gains.get(m, 0.0)
        adv.gain_share = gains.get(m, 0.0) / total if total > 0 else 0.0
        adv.rank = int(alloc.ranks.get(m, 0))
        adv.selected = keep.get(m) is None
        if not adv.selected and alloc.estimator in ("kfac", "pilot"):
            adv.rank, adv.rank_rule = 0, "module selection"
            adv.reasons.append(str(keep[m]))
        elif adv.rank == 0:
            adv.rank_rule = "no adapter"
            adv.reasons.append(
                f"no adapter: the allocation spends nothing here ({adv.gain_share:.1%} of the predicted gain)"
            )
        elif alloc.estimator == "newton-topk" and rule == "share allocation" and adv.estimators["spectral"] >= adv.rank:
            adv.rank_rule = "spectral floor"
        else:
            adv.rank_rule = rule


def _compensate(est: Estimates, quant: dict[str, Any] | None, chosen: Q.FormatOption, st: RecommendSettings) -> None:
    """Raise a module's rank to win back the share of the chosen format's cost that exceeds the tolerance."""
    comp = Q.compensation(quant, chosen.format, st.tolerance, chosen.loss_increase) if quant is not None else {}
    unbudgeted = st.param_budget is None and st.memory_budget is None
    for m, c in comp.items():
        adv = est.advice[m]
        adv.compensation = c
        if c["share_needed"] > 0 and unbudgeted and 0 < adv.rank < c["rank_kfac"]:
            adv.reasons.append(
                f"rank raised {adv.rank} -> {c['rank_kfac']} to win back "
                f"{c['share_needed']:.0%} of the {chosen.format} quantization cost"
            )
            adv.rank = c["rank_kfac"]
            adv.rank_rule = "compensation"
    keys = (
        "predicted_loss_increase",
        "measured_loss_increase",
        "hawq_proxy",
        "quadratic_exact",
        "quadratic_signs",
        "quadratic_kfac",
        "delta_rel_norm",
    )
    for m, adv in est.advice.items():
        adv.alpha = RSLORA_ALPHA if adv.rank > 0 else 0
        if quant is not None:
            adv.quantization = {f: {k: quant["formats"][f]["modules"][m][k] for k in keys} for f in quant["formats"]}


def _quantization_doc(
    quant: dict[str, Any] | None, chosen: Q.FormatOption, options: list[Q.FormatOption], ctx: _Context
) -> dict[str, Any]:
    st = ctx.st
    return {
        "format": chosen.format,
        "skip_modules": chosen.skip_modules,
        "bnb_config": Q.bnb_kwargs(
            chosen.format,
            ctx.heads + chosen.skip_modules,
            "bfloat16" if st.compute_dtype in ("bfloat16", "float32") else st.compute_dtype,
        ),
        "loss_increase": chosen.loss_increase,
        "tolerance_loss": st.tolerance * float(quant["base_eval_loss"]) if quant else None,
        "base_eval_loss": float(quant["base_eval_loss"]) if quant else None,
        "candidates": {
            o.format: {
                "loss_increase": o.loss_increase,
                "measured_whole": o.measured_whole,
                "predicted_targets": o.predicted_targets,
                "memory": o.memory,
                "memory_human": fmt_bytes(o.memory),
                "acceptable": o.acceptable,
                "skip_modules": o.skip_modules,
                "notes": o.notes,
            }
            for o in options
        },
        "spearman": {f: quant["formats"][f]["spearman"] for f in quant["formats"]} if quant else None,
    }


# ----------------------------------------------------------------------------------------------------------
# the recommendation
# ----------------------------------------------------------------------------------------------------------


def _load_analysis(analysis: str | Path | dict[str, Any] | AnalysisResult) -> AnalysisResult:
    """The analysis, typed: the one given, a parsed ``analysis.json``, or read from its folder or file."""
    if isinstance(analysis, (AnalysisResult, dict)):
        return _as_analysis(analysis)
    return load_analysis_result(analysis)


def _attach_measurements(est: Estimates) -> None:
    """Record on each module's advice its K-FAC prediction and its pilot measurement (where there are any)."""
    for m, info in est.kfac_info.items():
        est.advice[m].predicted = info
    for m, pm in ((est.pilot_doc or {}).get("modules") or {}).items():
        est.advice[m].pilot = {"value": pm["value"], "energy_share": pm["energy_share"]}


def _allocate_with_budget(
    est: Estimates, st: RecommendSettings, keep: dict[str, str | None], ctx: _Context
) -> tuple[dict[str, Allocation], str | None]:
    """Every estimator's allocation, water-filled into ``--param-budget`` when one is set, and the budget note."""
    if st.param_budget is None:
        return allocate_ranks(est, st, keep), None
    _check_param_budget(st.param_budget, ctx.shapes)
    allocs = allocate_ranks(est, st, keep, budget=st.param_budget)
    if not any(allocs[st.estimator].ranks.values()):
        raise HessrankError(f"parameter budget {st.param_budget:,} buys no rank step with a predicted gain")
    return allocs, f"ranks water-filled into a budget of {st.param_budget:,} trainable parameters"


def _choose_format(
    est: Estimates,
    st: RecommendSettings,
    keep: dict[str, str | None],
    ctx: _Context,
    quant: dict[str, Any] | None,
    chosen_alloc: Allocation,
    budget_note: str | None,
) -> tuple[list[Q.FormatOption], Q.FormatOption, str | None]:
    """The format candidates and the chosen one; under ``--memory-budget`` the ranks refitted with it (and noted)."""
    options = format_candidates(quant, ctx, {m: a.rank for m, a in est.advice.items()})
    if st.memory_budget is not None:
        chosen, rk, budget_note = fit_memory_budget(est, ctx, keep, options)
        _apply(est, dataclasses.replace(chosen_alloc, ranks=rk), keep, "budget", st)
    else:
        chosen = Q.choose(options, None)
    return options, chosen, budget_note


def _uniform_rank_curve(
    est: Estimates, st: RecommendSettings, chosen_alloc: Allocation, ranks_now: dict[str, int]
) -> tuple[int, list[int], list[float]]:
    """The global rank and the uniform-rank curve (ranks, predicted decrease) of the chosen estimator."""
    if st.estimator == "pilot" and est.pilot_doc is not None:
        # measured: the smallest uniform truncation of the pilot keeping the target share of its decrease
        rank0 = est.pilot_doc["eval_loss"]["rank0"]
        grid = [int(u["rank"]) for u in est.pilot_doc["uniform"]]
        uni = [rank0 - float(u["eval_loss"]) for u in est.pilot_doc["uniform"]]
        return chosen_alloc.global_rank, grid, uni
    curves = est.kfac if st.estimator == "kfac" and est.kfac is not None else est.newton
    kept_curves = [c for c in curves if ranks_now.get(c.name, 0) > 0 or st.estimator != "kfac"]
    return _global_rank(kept_curves, st.target_share)


def _lora_doc() -> dict[str, Any]:
    """The LoRA scaling section: rsLoRA with α = RSLORA_ALPHA, and why."""
    return {
        "use_rslora": True,
        "lora_alpha": RSLORA_ALPHA,
        "why": (
            f"rank-stable scaling α/√r with α = {RSLORA_ALPHA} (rsLoRA, Kalajdzievski 2023): the update's size "
            "no longer grows with r under Adam, so a small advised rank learns as fast as a large one; at r = 16 "
            "it is the folk recipe α = 32"
        ),
    }


def _confidence(est: Estimates, st: RecommendSettings, an: AnalysisResult) -> dict[str, Any]:
    """How far to trust the advice, judged on the chosen estimator's own data."""
    if st.estimator == "pilot" and est.pilot_doc is not None:
        return pilot_confidence(est.pilot_doc)
    if st.estimator == "kfac" and est.kfac_info:
        return kfac_confidence(est.kfac_info)
    return top_k_confidence(an)


def recommend(
    analysis: str | Path | dict[str, Any] | AnalysisResult, settings: RecommendSettings | None = None
) -> dict[str, Any]:
    """Build the recommendation document from an analysis (folder, file, parsed document or
    :class:`~hessrank.results.AnalysisResult`); ``Recommendation.from_dict`` gives it typed."""
    st = settings or RecommendSettings()
    st.check()
    an = _load_analysis(analysis)
    name, estimator_note = resolve_estimator(an, st.estimator)
    st = dataclasses.replace(st, estimator=name)
    if estimator_note:
        log.warning("%s", estimator_note)
    est = newton_estimates(an, st)
    _attach_measurements(est)
    keep = select_modules(est.kfac_info, st.min_gain_fraction)
    ctx = _Context.of(an, st)
    quant = an.quantization
    allocs, budget_note = _allocate_with_budget(est, st, keep, ctx)
    chosen_alloc = allocs[st.estimator]
    _apply(est, chosen_alloc, keep, "budget" if budget_note else "share allocation", st)
    options, chosen, budget_note = _choose_format(est, st, keep, ctx, quant, chosen_alloc, budget_note)
    _compensate(est, quant, chosen, st)
    ranks_now = {m: a.rank for m, a in est.advice.items()}
    if not any(ranks_now.values()):
        raise HessrankError("every module was judged negligible; nothing to adapt (check the analysis)")
    global_rank, grid, uni = _uniform_rank_curve(est, st, chosen_alloc, ranks_now)
    mem = ctx.forecast(chosen.format, ranks_now, chosen.skip_modules)
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hessrank_version": __version__,
        "analysis": {
            "model": an.model["name"],
            "data": an.data["source"],
            "created": an.created,
            "config": an.config,
            "seconds_units": (an.cost or {}).get("seconds_units"),
        },
        "model": an.model["name"],
        "task": an.model["task"],
        "head_modules": ctx.heads,
        "settings": {**st.__dict__, "target_share": st.target_share, "batch_size": ctx.batch, "seq_len": ctx.seq},
        "estimator": st.estimator,
        "estimator_note": estimator_note,
        "estimators": {k: a.to_dict() for k, a in allocs.items()},
        "calibration": est.calibration or None,
        "global_rank": int(global_rank),
        "lora": _lora_doc(),
        "uniform_curve": {"ranks": grid, "predicted_decrease": uni},
        "quantization": _quantization_doc(quant, chosen, options, ctx),
        "modules": {m: a.freeze().to_dict() for m, a in est.advice.items()},
        "selection": {
            "min_gain_fraction": st.min_gain_fraction,
            "dropped": sorted(m for m, why in keep.items() if why is not None),
        },
        "trainable_parameters": mem.trainable_parameters,
        "memory": mem.to_dict(),
        "budget": budget_note,
        "allocation": chosen_alloc.note if budget_note is None else None,
    }
    rec["confidence"] = _confidence(est, st, an)
    rec["rules_of_thumb"] = rules_of_thumb(rec, quant, st)
    rec["explanation"] = explain(rec, st)
    return rec


def rules_of_thumb(rec: dict[str, Any], quant: dict[str, Any] | None, st: RecommendSettings) -> list[dict[str, Any]]:
    """Where this measurement agrees or disagrees with the folk rules, with the numbers."""
    out = []
    g = rec["global_rank"]
    ranks = [d["rank"] for d in rec["modules"].values() if d["rank"] > 0]
    out.append(
        {
            "rule": "start at r = 8-16",
            "measured": f"global rank {g}; per-module ranks {min(ranks)}-{max(ranks)}",
            "verdict": "agrees" if 8 <= g <= 16 else ("smaller rank suffices" if g < 8 else "needs more"),
        }
    )
    uc = rec["uniform_curve"]
    full = max(uc["predicted_decrease"]) if uc["predicted_decrease"] else 0.0
    at = {r: d for r, d in zip(uc["ranks"], uc["predicted_decrease"])}
    r32 = max((d for r, d in at.items() if r <= 32), default=0.0)
    share32 = r32 / full if full > 0 else 1.0
    out.append(
        {
            "rule": "32-64 is usually enough",
            "measured": f"uniform rank 32 reaches {share32:.0%} of the predicted full-rank decrease",
            "verdict": "agrees" if share32 >= st.target_share else "disagrees: more than 32 needed",
        }
    )
    if quant is not None:
        base = float(quant["base_eval_loss"])
        lim = st.tolerance * base
        if "llm.int8" in quant["formats"]:
            inc = quant["formats"]["llm.int8"]["whole_model"]["measured_loss_increase"]
            out.append(
                {
                    "rule": "8-bit is safe",
                    "measured": f"LLM.int8 raises the held-out loss by {inc:.4g} ({inc / base:.2%} of {base:.4g})",
                    "verdict": "agrees" if inc <= lim else "disagrees",
                }
            )
        for f in ("nf4", "nf4-dq"):
            if f in quant["formats"]:
                inc = quant["formats"][f]["whole_model"]["measured_loss_increase"]
                comp_all = [
                    Q.rank_for_share(quant["formats"][f]["modules"][m]["compensation"], "kfac_share", 0.9)
                    for m in rec["modules"]
                ]
                med = int(np.median(comp_all)) if comp_all else None
                out.append(
                    {
                        "rule": "NF4 needs a larger rank, 64-128",
                        "measured": f"{f} raises the held-out loss by {inc:.4g} ({inc / base:.2%}); "
                        f"a rank-r correction recovers 90% of each module's K-FAC quadratic cost at median r = {med}",
                        "verdict": (
                            "within tolerance without a larger rank"
                            if inc <= lim
                            else (
                                "agrees"
                                if med is not None and 64 <= med <= 128
                                else f"disagrees: compensation rank {med}"
                            )
                        ),
                    }
                )
                break
    return out


def _explain_bits(rec: dict[str, Any], st: RecommendSettings) -> list[str]:
    q = rec["quantization"]
    if q["base_eval_loss"] is None:
        return ["Bit width: none — the analysis has no quantization measurements (analyze --quant-formats)."]
    cand = ", ".join(
        f"{f}: {c['loss_increase']:+.4g}{' (ok)' if c['acceptable'] else ''} at {c['memory_human']}"
        for f, c in q["candidates"].items()
    )
    desc = FORMAT_INFO[q["format"]].description if q["format"] in FORMAT_INFO else "no quantization"
    lines = [
        f"Bit width: {q['format']} — {desc}. "
        f"The tolerance is {st.tolerance:.1%} of the held-out loss {q['base_eval_loss']:.4g} = "
        f"{q['tolerance_loss']:.4g}; "
        f"measured increases (whole model, dequantized weights on held-out batches) and forecast memory: {cand}. "
        + ("The smallest-memory option within tolerance was chosen." if not rec.get("budget") else "")
    ]
    if q["skip_modules"]:
        lines.append(f"Kept unquantized (llm_int8_skip_modules): {', '.join(q['skip_modules'])}.")
    sp = q.get("spearman") or {}
    if sp:
        parts = [f"{f}: {v['predicted']:.2f}" if v.get("predicted") is not None else f"{f}: n/a" for f, v in sp.items()]
        lines.append(
            "Spearman correlation over modules of predicted (g·δ + ½δᵀHδ) vs measured loss increase: "
            + ", ".join(parts)
            + "."
        )
    return lines


def _explain_calibration(rec: dict[str, Any]) -> list[str]:
    lines = []
    for scope, c in (rec.get("calibration") or {}).items():
        if c.get("scale") is None:
            continue
        rat = [x for x in c["ratios"] if x is not None]
        line = (
            f"K-FAC calibration on scope {scope}: c = {c['scale']:.3g} (least squares of the top-{len(c['ratios'])} "
            f"Lanczos eigenvalues on the K-FAC Rayleigh quotients; ratios λᵢ/ρᵢ {min(rat):.3g}–{max(rat):.3g})"
        )
        if c.get("trace_ratio") is not None:
            line += f"; SLQ trace / calibrated K-FAC trace = {c['trace_ratio']:.3g}"
        for chk in c.get("exact_check") or []:
            if chk.get("scale_along_step") is not None:
                line += (
                    f"; along the rank-{chk['rank']} K-FAC step the exact curvature is {chk['scale_along_step']:.3g}×"
                )
        lines.append(line + ".")
    return lines


def _explain_module(m: str, d: dict[str, Any], estimator: str) -> str:
    e = d["estimators"]
    p = d.get("predicted_decrease")
    if estimator == "pilot" and d.get("pilot"):
        pl = d["pilot"]
        head = (
            f"{m}: rank {d['rank']} ({d['rank_rule']}); the pilot's whitened update keeps "
            f"{pl['energy_share'].get(str(d['rank']), 1.0):.0%} of its value at this rank"
            + (f"; K-FAC predicted decrease {p['peak']:.3g} at best" if p else "")
            + f"; top-k estimators: Newton-curve rank {e['newton_curve']}, spectral rank {e['spectral']}"
        )
    elif estimator == "kfac" and p:
        at = gain_at(ModuleCurve(m, 0, 0, tuple(p["ranks"]), tuple(p["decrease"])), d["rank"])
        head = (
            f"{m}: rank {d['rank']} ({d['rank_rule']}); K-FAC predicted decrease {at:.3g} at this "
            f"rank of {p['peak']:.3g} at best"
            + (f" (resolves {p['resolved_share']:.0%} of the unbiased signal)" if p.get("resolved_share") else "")
            + f"; top-k estimators: Newton-curve rank {e['newton_curve']}, spectral rank {e['spectral']}"
        )
    else:
        head = (
            f"{m}: rank {d['rank']} ({d['rank_rule']}); Newton-curve rank {e['newton_curve']}, energy rank "
            f"{e['newton_energy']}, spectral rank {e['spectral']} (N_eff {e['n_eff_topk']:.2f} from the top-k"
            + (f", {e['n_eff_slq']:.0f} from SLQ" if e.get("n_eff_slq") is not None else "")
            + ")"
        )
    return (
        head
        + f"; {d['gain_share']:.1%} of the predicted gain."
        + (" " + " ".join(d["reasons"]) if d["reasons"] else "")
    )


def explain(rec: dict[str, Any], st: RecommendSettings) -> list[str]:
    """A plain-language explanation of every choice, with its numbers."""
    mods = rec["modules"]
    est = rec.get("estimator", "newton-topk")
    lines = [f"Model {rec['model']} ({rec['task']})."]
    if rec.get("budget"):
        lines.append(f"Budget: {rec['budget']}.")
    if rec.get("estimator_note"):
        lines.append(f"Estimator: {rec['estimator_note']}.")
    if rec.get("allocation"):
        lines.append(f"Ranks ({est} estimator): {rec['allocation']}.")
    for name, alt in (rec.get("estimators") or {}).items():
        if name != est:
            lines.append(
                f"Alternative estimator {name}: {alt['lora_parameters']:,} LoRA parameters, global rank "
                f"{alt['global_rank']} (reported, not used)."
            )
    if est in ("kfac", "pilot"):
        lines += _explain_calibration(rec)
    lines += _explain_bits(rec, st)
    lines.append(
        f"One global rank: {rec['global_rank']} (smallest uniform rank whose "
        + ("measured truncation of the pilot keeps " if est == "pilot" else "predicted decrease reaches ")
        + f"{st.target_share:.0%} of the largest, {est} estimator, damping z = {st.z})."
    )
    conf = rec.get("confidence")
    if conf and conf["level"] == "low":
        lines.append(f"Low confidence in the ranks: {conf['note']}.")
    active = {m: d for m, d in mods.items() if d["rank"] > 0}
    lines += [_explain_module(m, d, est) for m, d in list(active.items())[:60]]
    skipped = [m for m, d in mods.items() if d["rank"] == 0]
    if skipped:
        lines.append(
            f"No adapter for {len(skipped)} module(s): "
            + ", ".join(skipped[:10])
            + ("..." if len(skipped) > 10 else "")
            + "."
        )
    mem = rec["memory"]
    lines.append(
        f"Memory forecast ({mem['assumptions']['device']}, batch {mem['assumptions']['batch_size']} x "
        f"{mem['assumptions']['seq_len']}, {mem['assumptions']['compute_dtype']}): {mem['total_human']} = "
        f"runtime {fmt_bytes(mem['runtime'])} + weights {fmt_bytes(mem['base_weights'])} + LoRA "
        f"{fmt_bytes(mem['lora_parameters'])} + gradients {fmt_bytes(mem['gradients'])} + AdamW "
        f"{fmt_bytes(mem['optimizer'])} + activations {fmt_bytes(mem['activations'])}; "
        f"{rec['trainable_parameters']:,} trainable parameters."
    )
    lines += [f"Rule of thumb '{r['rule']}': {r['verdict']} — {r['measured']}." for r in rec["rules_of_thumb"]]
    return lines


OUTPUT_FILES = (
    "recommendation.json",
    "lora_config.json",
    "bnb_config.json",
    "axolotl.yaml",
    "llamafactory.yaml",
    "explanation.md",
)


def write_recommendation(rec: dict[str, Any], out: str | Path, overwrite: bool = False) -> dict[str, str]:
    """Write ``recommendation.json``, the configs and ``explanation.md`` into ``out``.

    Files from an earlier ``recommend`` (a folder holding ``recommendation.json``) are replaced; config files of
    the same names that hessrank did not write are not, unless ``overwrite``.
    """
    out = Path(out)
    if not overwrite and not (out / "recommendation.json").exists():
        clash = [f for f in OUTPUT_FILES if (out / f).exists()]
        if clash:
            raise HessrankError(
                f"{out}: holds {', '.join(clash)} that hessrank did not write; pass --overwrite or choose another --out"
            )
    files = write_configs(rec, out)
    rec = dict(rec)
    rec["files"] = {**files, "explanation": "explanation.md"}
    write_json(out / "recommendation.json", rec)
    text = "# hessrank recommendation\n\n" + "\n".join(f"- {line}" for line in rec["explanation"]) + "\n"
    atomic_write(out / "explanation.md", lambda f: f.write(text))
    return rec["files"]
