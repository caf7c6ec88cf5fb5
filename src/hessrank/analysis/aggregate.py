"""``analysis.json`` and ``analysis.npz`` from the unit files, reading them back, and the console summary.

:func:`_aggregate` reads every unit under ``units/`` (one per repeat and scope, plus ``kfac.json``, ``quant.json``
and ``pilot.json`` when those steps ran) and writes the document, section by section (``_..._doc`` helpers):
per scope the mean and standard deviation over repeats (sample std, ddof = 1) of the eigenvalues and of each
effective dimension; the K-FAC calibration per scope; the cost. The schema is ``hessrank.analysis/1``
(``docs/schemas.md``). :func:`load_analysis` reads it back; :func:`summary_lines` prints it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as _dist
from ..errors import HessrankError
from ..io import read_json, read_npz, write_json, write_npz
from ..models import linear_modules, linear_shape
from ..runtime import _versions
from .config import NEWTON_Z, RANK_GRID, SCHEMA, AnalysisConfig, _safe


def _distribution(ctx: _dist.DistContext | None, num_batches: int) -> dict[str, Any]:
    """``analysis.json``'s ``distributed``: the process group and which analysis batches each rank evaluated."""
    world = 1 if ctx is None else ctx.world_size
    return {
        "world_size": world,
        "backend": None if ctx is None else ctx.backend,
        "batches_by_rank": _dist.assignment(num_batches, world),
    }


def _architecture(model: torch.nn.Module, task: str, num_parameters: int) -> dict[str, Any]:
    """What the memory forecast needs: linear layers bitsandbytes would quantize, sizes, head."""
    from ..engine.quantization import bnb_quantized_linears

    cfg = model.config
    lin = linear_modules(model)
    head_params = 0
    if task == "seq-cls":
        from ..engine.probe import find_head

        _, head = find_head(model)
        head_params = sum(p.numel() for p in head.parameters())
    return {
        "num_parameters": num_parameters,
        "linear_shapes": {n: list(linear_shape(lin[n])) for n in bnb_quantized_linears(model)},
        "hidden_size": int(getattr(cfg, "hidden_size", 0)),
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0)),
        "num_heads": int(getattr(cfg, "num_attention_heads", 1)),
        "vocab_size": int(cfg.vocab_size) if task == "causal-lm" else None,
        "head_params": int(head_params),
    }


def _mean_std(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    width = min(len(r) for r in rows)
    a = np.array([r[:width] for r in rows], dtype=np.float64)
    std = a.std(axis=0, ddof=1) if len(rows) > 1 else np.full(width, np.nan)
    return a.mean(axis=0).tolist(), std.tolist()


def _read_repeats(units_dir: Path, sname: str, repeats: int, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The unit documents of one scope, one per repeat; their arrays go into ``arrays`` as ``scope/rN/key``."""
    reps = []
    for rep in range(repeats):
        stem = f"r{rep}__{_safe(sname)}"
        reps.append(read_json(units_dir / f"{stem}.json"))
        for k, v in read_npz(units_dir / f"{stem}.npz").items():
            arrays[f"{sname}/r{rep}/{k}"] = v
    return reps


def _neff_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over repeats of each effective-dimension measure the first repeat has."""
    neff = {}
    for fam in ("n_eff_relative_topk", "n_eff_absolute_topk", "n_eff_relative_slq", "n_eff_absolute_slq"):
        if reps[0]["effective_dimension"].get(fam) is None:
            continue
        keys = reps[0]["effective_dimension"][fam].keys()
        neff[fam] = {
            key: {
                "mean": float(np.mean([r["effective_dimension"][fam][key] for r in reps])),
                "std": float(np.std([r["effective_dimension"][fam][key] for r in reps], ddof=1))
                if len(reps) > 1
                else None,
            }
            for key in keys
        }
    return neff


def _scope_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One scope's summary over its repeats: eigenvalue mean and std, λ_max, n_eff, convergence, size."""
    ev_mean, ev_std = _mean_std([r["eigenvalues"] for r in reps])
    neff = _neff_summary(reps)
    return {
        "eigenvalues_mean": ev_mean,
        "eigenvalues_std": ev_std,
        "lambda_max_mean": ev_mean[0],
        "n_eff": neff,
        "converged": all(r["converged"] for r in reps),
        "num_params": reps[0]["num_params"],
    }


def _model_doc(cfg: AnalysisConfig, lm: Any, task: str) -> dict[str, Any]:
    """The ``model`` section: name, class, local path, parameter count and task."""
    return {
        "name": cfg.model,
        "class": type(lm.model).__name__,
        "path": str(lm.path),
        "num_parameters": lm.info["num_parameters"],
        "task": task,
        **({"device_map": lm.info["device_map"]} if "device_map" in lm.info else {}),
    }


def _data_doc(cfg: AnalysisConfig, ds: Any, train: Any) -> dict[str, Any]:
    """The ``data`` section: source, kind, sizes, labels, template and examples per repeat."""
    return {
        "source": ds.source,
        "kind": ds.kind,
        "num_examples": len(ds),
        "train_examples": len(train),
        "label_names": ds.label_names,
        "template": ds.template,
        "analysis_examples_per_repeat": cfg.num_batches * cfg.batch_size,
    }


def _cost_doc(
    total_hvp: int,
    hvp_s: list[float],
    grad_s: list[float],
    started: float,
    unit_seconds: float,
    quant_doc: dict[str, Any] | None,
    kfac_doc: dict[str, Any] | None,
    pilot_doc: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``cost`` section: HVPs, mean HVP and graph times, and the seconds of this run and of the work units."""
    return {
        "hvp_total": total_hvp,
        "hvp_seconds_mean": float(np.mean(hvp_s)) if hvp_s else None,
        "graph_seconds_mean": float(np.mean(grad_s)) if grad_s else None,
        "seconds_this_run": time.time() - started,
        # compute in the work units (scopes and quantization), resumed ones included; model loading, the probe
        # and the first gradient graph are not in it
        "seconds_units": unit_seconds
        + float(quant_doc.get("seconds", 0.0) if quant_doc else 0.0)
        + float(kfac_doc.get("seconds", 0.0) if kfac_doc else 0.0)
        + float(pilot_doc.get("seconds", 0.0) if pilot_doc else 0.0),
    }


def _aggregate(
    cfg: AnalysisConfig,
    out: Path,
    scopes: list[tuple[str, str, list[str]]],
    module_info: dict,
    point: dict,
    lm: Any,
    ds: Any,
    train: Any,
    task: str,
    started: float,
    architecture: dict[str, Any],
    distribution: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the unit files into ``analysis.json`` and ``analysis.npz`` (written) and return the document."""
    units_dir = out / "units"
    scope_docs = []
    arrays: dict[str, np.ndarray] = {}
    total_hvp = 0
    unit_seconds = 0.0
    hvp_s: list[float] = []
    grad_s: list[float] = []
    for sname, kind, mods in scopes:
        reps = _read_repeats(units_dir, sname, cfg.repeats, arrays)
        total_hvp += sum(r["matvecs"] for r in reps)
        unit_seconds += sum(float(r["seconds"]) for r in reps)
        hvp_s += [r["hvp_seconds"] for r in reps]
        grad_s += [r["graph_seconds"] for r in reps]
        summary = _scope_summary(reps)
        scope_docs.append({"name": sname, "kind": kind, "modules": mods, "summary": summary, "repeats": reps})
    quant_doc = read_json(units_dir / "quant.json") if (units_dir / "quant.json").exists() else None
    kfac_doc = read_json(units_dir / "kfac.json") if (units_dir / "kfac.json").exists() else None
    pilot_doc = read_json(units_dir / "pilot.json") if (units_dir / "pilot.json").exists() else None
    if kfac_doc is not None:
        kfac_doc["calibration"] = _kfac_calibration(scope_docs, kfac_doc)
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "config": cfg.to_dict(),
        "model": _model_doc(cfg, lm, task),
        "data": _data_doc(cfg, ds, train),
        "analysis_point": point,
        "modules": module_info,
        "architecture": architecture,
        "newton_z": list(NEWTON_Z),
        "rank_grid": list(RANK_GRID),
        "scopes": scope_docs,
        "kfac": kfac_doc,
        "pilot": pilot_doc,
        "quantization": quant_doc,
        "cost": _cost_doc(total_hvp, hvp_s, grad_s, started, unit_seconds, quant_doc, kfac_doc, pilot_doc),
        "arrays": "analysis.npz",
        "distributed": distribution,
    }
    write_npz(out / "analysis.npz", arrays)
    write_json(out / "analysis.json", doc)
    return doc


def _kfac_calibration(scope_docs: list[dict[str, Any]], kfac_doc: dict[str, Any]) -> dict[str, Any]:
    """Per scope (repeat 0): the K-FAC scale c fitted on the top-k Lanczos pairs, and the SLQ trace check.

    c = Σλᵢ⁺ρᵢ/Σρᵢ² (:func:`hessrank.engine.kfac.calibration`); trace_ratio = tr(H)_SLQ / (c·Σ_m tr(A_m)tr(G_m)).
    """
    from ..engine.kfac import calibration

    out = {}
    for sd in scope_docs:
        r0 = sd["repeats"][0]
        rho = r0.get("kfac_rayleigh") or []
        if not rho:
            continue
        cal = calibration(r0["eigenvalues"], rho)
        k_trace = sum(kfac_doc["factors"][m]["trace"] for m in sd["modules"] if m in kfac_doc["factors"])
        tr = r0.get("trace")
        cal["trace_ratio"] = tr / (cal["scale"] * k_trace) if tr and cal["scale"] and k_trace > 0 else None
        cal["exact_check"] = r0.get("kfac_exact_check")
        out[sd["name"]] = cal
    return out


def load_analysis(path: str | Path) -> dict[str, Any]:
    """Read ``analysis.json`` (a folder or the file) and check its schema."""
    p = Path(path)
    if not p.exists():
        raise HessrankError(f"{p}: no such analysis folder or file (run hessrank analyze --out {p} first)")
    if p.is_dir():
        p = p / "analysis.json"
    return read_json(p, schema=SCHEMA)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A console summary of an analysis document."""
    lines = [
        f"model {doc['model']['name']} ({doc['model']['class']}, task {doc['model']['task']}); "
        f"analysis point: {doc['analysis_point']['kind']}",
        f"data {doc['data']['source']}: {doc['data']['analysis_examples_per_repeat']} examples per repeat, "
        f"{doc['config']['repeats']} repeat(s)",
        "",
        f"{'scope':<44}{'params':>11}{'lambda_max':>13}{'lambda_k':>11}{'N_eff(1e-2)':>13}{'min neg':>11}"
        f"{'HVPs':>6}{'conv':>6}",
    ]
    for s in doc["scopes"]:
        r0 = s["repeats"][0]
        sm = s["summary"]
        ev = sm["eigenvalues_mean"]
        ne = sm["n_eff"].get("n_eff_relative_slq") or sm["n_eff"]["n_eff_relative_topk"]
        ne2 = ne.get("0.01", {})
        neff = f"{ne2.get('mean', float('nan')):.1f}"
        if ne2.get("std") is not None:
            neff += f"±{ne2['std']:.1f}"
        neg = min(r0["negative_eigenvalues"]) if r0["negative_eigenvalues"] else float("nan")
        lines.append(
            f"{s['name'][:43]:<44}{sm['num_params']:>11,}{ev[0]:>13.4g}{ev[-1]:>11.3g}{neff:>13}{neg:>11.3g}"
            f"{sum(r['matvecs'] for r in s['repeats']):>6}{'yes' if sm['converged'] else 'no':>6}"
        )
    c = doc["cost"]
    if c.get("hvp_seconds_mean") is not None:
        lines.append("")
        lines.append(
            f"{c['hvp_total']} HVPs, {c['hvp_seconds_mean']:.3f} s per HVP; building the gradient graphs took "
            f"{c['graph_seconds_mean']:.3f} s per scope"
        )
    return lines
