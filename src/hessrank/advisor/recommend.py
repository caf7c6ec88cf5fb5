"""From ``analysis.json`` to ``recommendation.json`` and the configs other tools accept.

Reads only the analysis document (no model), so it is cheap and testable on synthetic spectra. The rank of each
module is ``max(spectral, Newton-curve)`` (the Newton curve rank is the alignment-aware estimate; the spectral
rank a parameter-counting floor), snapped to the grid; modules whose predicted gain and curvature are both below
1% of the total get no adapter. Under a parameter or memory budget, ranks come from water-filling instead
(:mod:`hessrank.advisor.rank`). The bit width follows :mod:`hessrank.advisor.quant`; the memory forecast
:mod:`hessrank.advisor.memory`. Every choice is explained in plain language with its numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..analysis import load_analysis
from ..errors import HessrankError
from ..io import write_json
from ..quantization import FORMAT_INFO
from . import quant as Q
from .export import write_configs
from .memory import Architecture, fmt_bytes, forecast
from .rank import (
    JointCurve,
    ModuleCurve,
    ScopeModel,
    allocate,
    curve_rank,
    lora_params,
    module_curves_from_analysis,
    predicted_decrease,
    share_allocation,
    snap_to_grid,
    spectral_rank,
    water_fill,
)

log = logging.getLogger(__name__)

SCHEMA = "hessrank.recommendation/1"


@dataclass(frozen=True)
class RecommendSettings:
    """Knobs of the advisor (all have documented defaults)."""

    tolerance: float = Q.DEFAULT_TOLERANCE  #: allowed quantization loss increase, share of the held-out loss
    param_budget: int | None = None
    memory_budget: int | None = None
    z: str = "0.01"  #: damping of the Newton step, relative to λ_max
    share: float = 0.9  #: share of the predicted decrease a rank must reach (curve knee)
    batch_size: int | None = None  #: training batch for the memory forecast (default: the analysis batch)
    seq_len: int | None = None  #: training sequence length (default: the analysis max length)
    compute_dtype: str = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"

    def check(self) -> None:
        if not 0 < self.tolerance < 1:
            raise HessrankError(f"tolerance must be in (0, 1) (a share of the held-out loss), got {self.tolerance}")
        if self.param_budget is not None and self.param_budget < 1:
            raise HessrankError(f"parameter budget must be a positive number of parameters, got {self.param_budget}")
        if self.param_budget is not None and self.memory_budget is not None:
            raise HessrankError("give either --param-budget or --memory-budget, not both")
        if not 0 < self.share <= 1:
            raise HessrankError(f"share must be in (0, 1], got {self.share}")


def _module_sources(doc: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """For each target module, the (scope, repeat-0 result) its per-module numbers come from.

    A module's own scope if analysed, else its group, else the joint scope.
    """
    pref = {"module": 0, "group": 1, "joint": 2}
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for scope in sorted(doc["scopes"], key=lambda s: pref[s["kind"]]):
        for m in scope["modules"]:
            out.setdefault(m, (scope, scope["repeats"][0]))
    return out


#: λ_k/λ_1 above which the advised ranks get ``confidence.level = "low"``. Chosen from the four real cases
#: of reports/validation.md (λ_k/λ_1 0.025, 0.088, 0.169, 0.426 with paired shortfalls of the advice against its
#: best rung of 1.0%, 2.2%, 6.0% and 10.8%): above 0.1 the advice fell short by well over the 2% tolerance.
#: Four points; a provisional threshold, not a fitted law.
FLAT_TOP_K = 0.1


def top_k_confidence(doc: dict[str, Any], threshold: float = FLAT_TOP_K) -> dict[str, Any]:
    """How far each rank-bearing scope's top-k spectrum decayed: λ_k/λ_1 (repeat 0, positive part).

    The Newton-step rank and the joint allocation see only the top-k eigen-subspace. When λ_k is still a large
    fraction of λ_1 the spectrum has not flattened inside that subspace: directions beyond k carry curvature the
    advice cannot see, and the advised ranks are then best read as lower bounds (measured: reports/validation.md).
    """
    ratios: dict[str, float] = {}
    k = 0
    for scope, rep in _module_sources(doc).values():
        if scope["name"] in ratios:
            continue
        lam = np.sort(np.asarray(rep["eigenvalues"], dtype=np.float64))[::-1]
        if rep.get("num_params") is not None and lam.size >= int(rep["num_params"]):
            continue  # the whole spectrum is known: nothing lies beyond the top-k
        if lam.size and lam[0] > 0:
            ratios[scope["name"]] = float(max(lam[-1], 0.0) / lam[0])
            k = max(k, int(lam.size))
    worst = max(ratios.values()) if ratios else None
    low = worst is not None and worst > threshold
    note = (
        f"λ_k/λ_1 = {worst:.3g} > {threshold:g}: the top-{k} spectrum is still flat, so the advised ranks are "
        "likely lower bounds (both measured cases above this ratio fell short by 6–11%); analyze with a larger "
        "--top-k, or validate with more steps and a ladder beyond 4r"
        if low
        else (f"λ_k/λ_1 = {worst:.3g} ≤ {threshold:g}" if worst is not None else "no positive top eigenvalue")
    )
    return {"level": "low" if low else "normal", "top_k_ratio": ratios, "threshold": threshold, "note": note}


def _module_n_eff(scope: dict[str, Any], rep: dict[str, Any], module: str, z_rel: float) -> dict[str, float | None]:
    """N_eff of a module: its own scope's (top-k and SLQ), or Σᵢ λᵢ/(λᵢ+z)·massᵢ,ₘ from a shared scope."""
    key = f"{z_rel:g}"
    if scope["kind"] == "module":
        ed = rep["effective_dimension"]
        slq = ed.get("n_eff_relative_slq") or {}
        return {"topk": ed["n_eff_relative_topk"][key], "slq": slq.get(key)}
    lam = np.clip(np.asarray(rep["eigenvalues"]), 0, None)
    z = z_rel * float(lam.max()) if lam.max() > 0 else z_rel
    mass = np.asarray(rep["module_mass"][module])
    return {"topk": float(np.sum(lam / (lam + z) * mass)), "slq": None}


def _uniform_curve(curves: list[ModuleCurve], grid: list[int]) -> list[float]:
    """Σ over modules of the predicted decrease when every module gets rank r (capped at its full rank)."""
    total = []
    for r in grid:
        s = 0.0
        for c in curves:
            best = 0.0
            for rr, d in zip(c.ranks, c.decrease):
                if rr <= r:
                    best = max(best, d)
            s += best
        total.append(s)
    return total


def recommend(analysis: str | Path | dict[str, Any], settings: RecommendSettings | None = None) -> dict[str, Any]:
    """Build the recommendation document from an analysis (folder, file or parsed document)."""
    st = settings or RecommendSettings()
    st.check()
    doc = analysis if isinstance(analysis, dict) else load_analysis(analysis)
    zkey = st.z
    if zkey not in {f"{c:g}" for c in doc["newton_z"]}:
        raise HessrankError(f"z '{zkey}' was not analysed; analysed: {', '.join(f'{c:g}' for c in doc['newton_z'])}")
    shapes = {m: tuple(v["shape"]) for m, v in doc["modules"].items()}
    sources = _module_sources(doc)
    arch = Architecture.from_dict(doc["architecture"])
    task = doc["model"]["task"]
    heads = [doc["analysis_point"]["head"]] if doc["analysis_point"].get("head") else []
    batch = st.batch_size or int(doc["config"]["batch_size"])
    seq = st.seq_len or int(doc["config"]["max_length"])
    head_params = int(doc["architecture"].get("head_params", 0))

    # ---- per-module estimators
    modules: dict[str, dict[str, Any]] = {}
    curves: list[ModuleCurve] = []
    jcurves: list[JointCurve] = []  # the same curves with their eigen-coordinates (joint model, cross terms)
    scope_models: dict[str, ScopeModel] = {}
    for m in doc["modules"]:
        scope, rep = sources[m]
        o, i = shapes[m]
        nd = rep["newton"][zkey]["per_module"].get(m)
        if nd is None:
            raise HessrankError(f"analysis has no Newton-step data for module '{m}'")
        c = module_curves_from_analysis({"newton": {zkey: {"per_module": {m: nd}}}}, zkey, {m: (o, i)})[0]
        curves.append(c)
        if "coords" in nd["curve"]:
            jcurves.append(
                JointCurve(
                    m, o, i, scope["name"], tuple(nd["curve"]["ranks"]), tuple(tuple(x) for x in nd["curve"]["coords"])
                )
            )
            scope_models[scope["name"]] = ScopeModel(tuple(rep["eigenvalues"]), tuple(rep["grad_projections"]))
        ne = _module_n_eff(scope, rep, m, float(zkey))
        spec_topk = spectral_rank(ne["topk"] or 0.0, o, i)
        spec_slq = spectral_rank(ne["slq"], o, i) if ne["slq"] is not None else None
        spec = spec_slq if spec_slq is not None else spec_topk
        ncurve = snap_to_grid(curve_rank(nd["curve"]["ranks"], nd["curve"]["predicted_change"], st.share), o, i)
        nenergy = snap_to_grid(nd["energy_rank"]["0.9"], o, i)
        share = rep["module_curvature_share"].get(m, 0.0) if scope["kind"] != "module" else None
        modules[m] = {
            "shape": [o, i],
            "source_scope": scope["name"],
            "estimators": {
                "n_eff_topk": ne["topk"],
                "n_eff_slq": ne["slq"],
                "spectral": spec,
                "spectral_topk": spec_topk,
                "newton_curve": ncurve,
                "newton_energy": nenergy,
            },
            "predicted_decrease_full_rank": float(max(c.decrease) if c.decrease else 0.0),
            "curvature_share": share,
            "reasons": [],
        }

    total_gain = sum(d["predicted_decrease_full_rank"] for d in modules.values())
    joint = len(jcurves) == len(curves)

    def allocate_share(share: float) -> tuple[dict[str, int], int, float]:
        return allocate(jcurves, scope_models, share=share) if joint else share_allocation(curves, share)

    def allocate_budget(budget: int) -> dict[str, int]:
        return allocate(jcurves, scope_models, param_budget=budget)[0] if joint else water_fill(curves, budget)

    def decrease_of(ranks: dict[str, int]) -> float:
        if joint:
            return predicted_decrease(jcurves, scope_models, ranks)
        return sum(_gain_at(c, ranks[c.name]) for c in curves)

    alloc, alloc_params, alloc_share = allocate_share(st.share)
    for m, d in modules.items():
        est = d["estimators"]
        d["gain_share"] = d["predicted_decrease_full_rank"] / total_gain if total_gain > 0 else 0.0
        r = alloc[m]
        if r == 0:
            d["rank"] = 0
            d["rank_rule"] = "no adapter"
            d["reasons"].append(
                f"no adapter: the cheapest allocation reaching {st.share:.0%} of the predicted gain "
                f"spends nothing here ({d['gain_share']:.1%} of the full-rank gain)"
            )
        elif est["spectral"] > r:
            d["rank"] = est["spectral"]
            d["rank_rule"] = "spectral floor"
        else:
            d["rank"] = r
            d["rank_rule"] = "share allocation"
    allocation_note = (
        f"the cheapest allocation by predicted gain per parameter reaching {st.share:.0%} of the "
        f"full-rank predicted decrease reaches {alloc_share:.1%} with {alloc_params:,} LoRA parameters"
        + (
            " (joint quadratic model of the shared scope, cross terms included)"
            if joint
            else " (modules treated as separable: the analysis has no eigen-coordinates)"
        )
    )

    # ---- quantization options, memory
    quant = doc.get("quantization")

    def memory_of(fmt: str, skip: list[str], ranks: dict[str, int] | None = None) -> int:
        rk = ranks if ranks is not None else {m: d["rank"] for m, d in modules.items()}
        return forecast(
            arch,
            fmt,
            rk,
            shapes,
            batch,
            seq,
            st.compute_dtype,
            skip,
            st.gradient_checkpointing,
            st.device,
            extra_trainable=head_params,
        ).total

    budget_note = None
    if (st.param_budget is not None or st.memory_budget is not None) and st.param_budget is not None:
        smallest = min(lora_params(1, o, i) for o, i in shapes.values())
        if st.param_budget < smallest:
            raise HessrankError(
                f"parameter budget {st.param_budget:,} is below the smallest rank-1 adapter ({smallest:,} parameters)"
            )
        ranks = allocate_budget(st.param_budget)
        if not any(ranks.values()):
            raise HessrankError(
                f"parameter budget {st.param_budget:,} buys no rank step with a predicted gain; "
                f"the cheapest adapter here needs {smallest:,} parameters"
            )
        for m, r in ranks.items():
            modules[m]["rank"] = r
            modules[m]["rank_rule"] = "budget"
        budget_note = f"ranks water-filled into a budget of {st.param_budget:,} trainable parameters"

    options: list[Q.FormatOption]
    if quant is not None:
        options = Q.format_options(quant, st.tolerance, memory_of, heads)
    else:
        options = [
            Q.FormatOption(
                "none",
                [],
                0.0,
                None,
                None,
                memory_of("none", heads),
                True,
                ["no quantization measured (run analyze with --quant-formats)"],
            )
        ]
    if st.memory_budget is not None:
        # maximise predicted quality: for each format, water-fill what memory is left after the base model
        best = None
        for opt in options:
            base = memory_of(opt.format, heads + opt.skip_modules, {m: 0 for m in modules})
            left = st.memory_budget - base
            per_param = 16  # fp32 adapter + gradient + two AdamW moments
            pb = int(left // per_param)
            if pb <= 0:
                continue
            rk = allocate_budget(pb)
            if not any(rk.values()):
                continue
            gain = decrease_of(rk)
            score = gain - opt.loss_increase
            if best is None or score > best[0]:
                best = (score, opt, rk, pb)
        if best is None:
            smallest = min(memory_of(o.format, heads + o.skip_modules, {m: 0 for m in modules}) for o in options)
            raise HessrankError(
                f"memory budget {fmt_bytes(st.memory_budget)} is below the forecast of the base "
                f"model alone ({fmt_bytes(smallest)}) in every format"
            )
        _, chosen, rk, pb = best
        for m, r in rk.items():
            modules[m]["rank"] = r
            modules[m]["rank_rule"] = "budget"
        budget_note = (
            f"memory budget {fmt_bytes(st.memory_budget)}: {chosen.format} leaves room for {pb:,} "
            "trainable parameters, water-filled by predicted gain"
        )
        for o in options:
            o.memory = memory_of(o.format, heads + o.skip_modules)
    else:
        chosen = Q.choose(options, None)

    # ---- compensation for the chosen format
    comp = Q.compensation(quant, chosen.format, st.tolerance, chosen.loss_increase) if quant is not None else {}
    for m, c in comp.items():
        d = modules[m]
        d["compensation"] = c
        unbudgeted = st.param_budget is None and st.memory_budget is None
        if c["share_needed"] > 0 and unbudgeted and 0 < d["rank"] < c["rank_kfac"]:
            d["reasons"].append(
                f"rank raised {d['rank']} -> {c['rank_kfac']} to win back "
                f"{c['share_needed']:.0%} of the {chosen.format} quantization cost"
            )
            d["rank"] = c["rank_kfac"]
            d["rank_rule"] = "compensation"
    for m, d in modules.items():
        d["alpha"] = 2 * d["rank"]
        if quant is not None:
            d["quantization"] = {
                f: {
                    k: quant["formats"][f]["modules"][m][k]
                    for k in (
                        "predicted_loss_increase",
                        "measured_loss_increase",
                        "hawq_proxy",
                        "quadratic_exact",
                        "quadratic_signs",
                        "quadratic_kfac",
                        "delta_rel_norm",
                    )
                }
                for f in quant["formats"]
            }

    # ---- one global rank
    grid = sorted({r for c in curves for r in c.ranks})
    uni = _uniform_curve(curves, grid)
    global_rank = curve_rank(grid, [-u for u in uni], st.share) if uni and max(uni) > 0 else 1
    active = [d["rank"] for d in modules.values() if d["rank"] > 0]
    if not active:
        raise HessrankError("every module was judged negligible; nothing to adapt (check the analysis)")
    ranks_now = {m: d["rank"] for m, d in modules.items()}
    mem = forecast(
        arch,
        chosen.format,
        ranks_now,
        shapes,
        batch,
        seq,
        st.compute_dtype,
        heads + chosen.skip_modules,
        st.gradient_checkpointing,
        st.device,
        extra_trainable=head_params,
    )
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hessrank_version": __version__,
        "analysis": {
            "model": doc["model"]["name"],
            "data": doc["data"]["source"],
            "created": doc["created"],
            "config": doc["config"],
            "seconds_units": doc.get("cost", {}).get("seconds_units"),
        },
        "model": doc["model"]["name"],
        "task": task,
        "head_modules": heads,
        "settings": {**st.__dict__, "batch_size": batch, "seq_len": seq},
        "global_rank": int(global_rank),
        "uniform_curve": {"ranks": grid, "predicted_decrease": uni},
        "quantization": {
            "format": chosen.format,
            "skip_modules": chosen.skip_modules,
            "bnb_config": Q.bnb_kwargs(
                chosen.format,
                heads + chosen.skip_modules,
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
        },
        "modules": modules,
        "trainable_parameters": mem.trainable_parameters,
        "memory": mem.to_dict(),
        "budget": budget_note,
        "allocation": allocation_note if budget_note is None else None,
    }
    rec["confidence"] = top_k_confidence(doc)
    rec["rules_of_thumb"] = rules_of_thumb(rec, quant, st)
    rec["explanation"] = explain(rec, st)
    return rec


def _gain_at(c: ModuleCurve, r: int) -> float:
    best = 0.0
    for rr, d in zip(c.ranks, c.decrease):
        if rr <= r:
            best = max(best, d)
    return best


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
            "verdict": "agrees" if share32 >= st.share else "disagrees: more than 32 needed",
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
                comp = [d.get("compensation", {}).get("rank_kfac_90") for d in rec["modules"].values()]
                comp_all = [
                    Q.rank_for_share(quant["formats"][f]["modules"][m]["compensation"], "kfac_share", 0.9)
                    for m in rec["modules"]
                ]
                med = int(np.median(comp_all)) if comp_all else None
                del comp
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


def explain(rec: dict[str, Any], st: RecommendSettings) -> list[str]:
    """A plain-language explanation of every choice, with its numbers."""
    lines = []
    q = rec["quantization"]
    mods = rec["modules"]
    lines.append(f"Model {rec['model']} ({rec['task']}).")
    if rec.get("budget"):
        lines.append(f"Budget: {rec['budget']}.")
    if rec.get("allocation"):
        lines.append(
            f"Ranks: {rec['allocation']}; each adapted module keeps at least its spectral (parameter-counting) rank."
        )
    if q["base_eval_loss"] is not None:
        cand = ", ".join(
            f"{f}: {c['loss_increase']:+.4g}{' (ok)' if c['acceptable'] else ''} at {c['memory_human']}"
            for f, c in q["candidates"].items()
        )
        desc = FORMAT_INFO[q["format"]].description if q["format"] in FORMAT_INFO else "no quantization"
        lines.append(
            f"Bit width: {q['format']} — {desc}. "
            f"The tolerance is {st.tolerance:.1%} of the held-out loss {q['base_eval_loss']:.4g} = "
            f"{q['tolerance_loss']:.4g}; "
            f"measured increases (whole model, dequantized weights on held-out batches) and forecast memory: {cand}. "
            + ("The smallest-memory option within tolerance was chosen." if not rec.get("budget") else "")
        )
        if q["skip_modules"]:
            lines.append(f"Kept unquantized (llm_int8_skip_modules): {', '.join(q['skip_modules'])}.")
        sp = q.get("spearman") or {}
        if sp:
            parts = [
                f"{f}: {v['predicted']:.2f}" if v.get("predicted") is not None else f"{f}: n/a" for f, v in sp.items()
            ]
            lines.append(
                "Spearman correlation over modules of predicted (g·δ + ½δᵀHδ) vs measured loss increase: "
                + ", ".join(parts)
                + "."
            )
    else:
        lines.append("Bit width: none — the analysis has no quantization measurements (analyze --quant-formats).")
    active = {m: d for m, d in mods.items() if d["rank"] > 0}
    lines.append(
        f"One global rank: {rec['global_rank']} (smallest uniform rank whose predicted decrease reaches "
        f"{st.share:.0%} of the full-rank decrease under the quadratic model, damping z = {st.z}·λ_max)."
    )
    conf = rec.get("confidence")
    if conf and conf["level"] == "low":
        lines.append(f"Low confidence in the ranks: {conf['note']}.")
    by_rule: dict[str, list[str]] = {}
    for m, d in active.items():
        by_rule.setdefault(d["rank_rule"], []).append(m)
    for m, d in list(active.items())[:60]:
        e = d["estimators"]
        lines.append(
            f"{m}: rank {d['rank']} ({d['rank_rule']}); Newton-curve rank {e['newton_curve']}, energy rank "
            f"{e['newton_energy']}, spectral rank {e['spectral']} (N_eff {e['n_eff_topk']:.2f} from the top-k"
            + (f", {e['n_eff_slq']:.0f} from SLQ" if e.get("n_eff_slq") is not None else "")
            + f"); {d['gain_share']:.1%} of the predicted gain."
            + (" " + " ".join(d["reasons"]) if d["reasons"] else "")
        )
    skipped = [m for m, d in mods.items() if d["rank"] == 0]
    if skipped:
        lines.append(
            f"No adapter for {len(skipped)} module(s) where the allocation spends nothing: "
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
    for r in rec["rules_of_thumb"]:
        lines.append(f"Rule of thumb '{r['rule']}': {r['verdict']} — {r['measured']}.")
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
    from ..io import atomic_write

    atomic_write(out / "explanation.md", lambda f: f.write(text))
    return rec["files"]
