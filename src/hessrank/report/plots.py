"""The report's figures, drawn with matplotlib from the documented files only (``docs/schemas.md``).

Every function takes parsed documents and returns a :class:`matplotlib.figure.Figure` (or ``None`` when the
documents hold nothing to draw); :func:`png` turns a figure into PNG bytes. One style for all (:data:`STYLE`):
titled, labelled axes, a colour per role (advice, ladder, competitors) that stays the same across figures.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

STYLE: dict[str, Any] = {
    "figure.figsize": (7.0, 4.2),
    "figure.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "font.size": 9,
}
ADVICE = "#d62728"  # the advice, in every figure
LADDER = "#1f77b4"  # the rank ladder
OTHER = "#7f7f7f"  # competitors and other methods
KNEE = "#2ca02c"


def _fig(title: str, xlabel: str, ylabel: str, size: tuple[float, float] | None = None) -> tuple[Figure, Any]:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=size or STYLE["figure.figsize"])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    with plt.rc_context(STYLE):
        fig.tight_layout()
        fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _short(module: str) -> str:
    """``bert.encoder.layer.3.attention.self.value`` → ``3.value``; names without a layer index stay as they are."""
    m = re.search(r"\.(\d+)\.", f".{module}.")
    return f"{m.group(1)}.{module.split('.')[-1]}" if m else module


# ----------------------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------------------


def eigenvalues(analysis: dict[str, Any], max_scopes: int = 6) -> Figure | None:
    """Top-k eigenvalues of each scope on a log scale; error bars: std over repeats, else Lanczos error bounds."""
    scopes = sorted(analysis["scopes"], key=lambda s: {"joint": 0, "group": 1, "module": 2}[s["kind"]])[:max_scopes]
    if not scopes:
        return None
    fig, ax = _fig("Top eigenvalues of the Hessian per scope", "eigenvalue index i", "λᵢ (log scale)")
    for s in scopes:
        mean = np.asarray(s["summary"]["eigenvalues_mean"], dtype=float)
        std = s["summary"].get("eigenvalues_std") or []
        err = np.asarray([np.nan if x is None else x for x in std], dtype=float) if std else np.full_like(mean, np.nan)
        if not np.isfinite(err).any():
            err = np.asarray(s["repeats"][0].get("error_bounds") or np.zeros_like(mean), dtype=float)[: len(mean)]
        keep = mean > 0
        idx = np.arange(1, len(mean) + 1)
        ax.errorbar(idx[keep], mean[keep], yerr=err[keep], marker="o", ms=3, capsize=2, label=s["name"])
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    return fig


def spectral_density(analysis: dict[str, Any], arrays: dict[str, np.ndarray]) -> Figure | None:
    """SLQ spectral density of each scope: the quadrature nodes (Ritz values, weighted, averaged over probes) as
    stems, and their Gaussian broadening (width 1/300 of the spectrum's span) as a curve; log density axis."""
    found = []
    for s in analysis["scopes"]:
        key = f"{s['name']}/r0/slq/nodes"
        if key in arrays:
            found.append((s["name"], np.atleast_2d(arrays[key]), np.atleast_2d(arrays[f"{s['name']}/r0/slq/weights"])))
    if not found:
        return None
    fig, ax = _fig("Spectral density (stochastic Lanczos quadrature)", "eigenvalue λ", "density (log scale)")
    top = 0.0
    for name, nodes, weights in found[:4]:
        lo, hi = float(nodes.min()), float(nodes.max())
        span = max(hi - lo, 1e-12)
        grid = np.linspace(lo - 0.02 * span, hi + 0.02 * span, 3000)
        sigma = span / 300
        dens = np.zeros_like(grid)
        for x, w in zip(nodes.ravel(), weights.ravel() / len(nodes)):
            dens += w * np.exp(-0.5 * ((grid - x) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        top = max(top, float(dens.max()))
        (line,) = ax.plot(grid, dens, label=f"{name} (broadened)")
        ax.vlines(
            nodes.ravel(),
            1e-8,
            np.maximum(weights.ravel() / len(nodes) / sigma, 1e-8),
            color=line.get_color(),
            alpha=0.35,
            lw=1,
        )
    ax.set_yscale("log")
    ax.set_ylim(1e-6 * top, 3 * top)
    ax.legend(loc="upper right")
    return fig


def _layer_type_grid(modules: Sequence[str], values: dict[str, float]) -> tuple[list[str], list[str], np.ndarray]:
    layers: list[str] = []
    types: list[str] = []
    for m in modules:
        mm = re.search(r"\.(\d+)\.", f".{m}.")
        layer = mm.group(1) if mm else "-"
        kind = m.split(".")[-1]
        if layer not in layers:
            layers.append(layer)
        if kind not in types:
            types.append(kind)
    grid = np.full((len(types), len(layers)), np.nan)
    for m in modules:
        mm = re.search(r"\.(\d+)\.", f".{m}.")
        grid[types.index(m.split(".")[-1]), layers.index(mm.group(1) if mm else "-")] = values.get(m, np.nan)
    return layers, types, grid


def heatmap(
    modules: Sequence[str], values: dict[str, float], title: str, label: str, log: bool = False, fmt: str = "{:.3g}"
) -> Figure | None:
    """A layer × module-type heat map of one number per module, each cell annotated."""
    if not modules:
        return None
    layers, types, grid = _layer_type_grid(modules, values)
    width = max(6.0, 0.45 * len(layers) + 2.5)
    fig, ax = _fig(title, "layer", "module type", size=(width, 1.0 + 0.55 * len(types) + 1.2))
    shown = np.log10(np.where(grid > 0, grid, np.nan)) if log else grid
    im = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(types)), types)
    ax.grid(False)
    for i in range(len(types)):
        for j in range(len(layers)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", fontsize=7, color="white")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"log10 {label}" if log else label)
    return fig


def rank_curves(rec: dict[str, Any], max_modules: int = 12) -> Figure | None:
    """The predicted loss decrease of a uniform rank r (sum over modules) and the largest modules' own curves."""
    uc = rec.get("uniform_curve") or {}
    if not uc.get("ranks"):
        return None
    fig, ax = _fig(
        f"Predicted loss decrease vs rank ({rec.get('estimator', 'newton-topk')} estimator)",
        "LoRA rank r (log scale)",
        "predicted decrease of the held-out loss",
    )
    ax.plot(uc["ranks"], uc["predicted_decrease"], color=ADVICE, marker="o", lw=2, label="all modules, uniform rank")
    ax.axvline(rec["global_rank"], color=ADVICE, ls="--", lw=1, label=f"advised global rank {rec['global_rank']}")
    mods = [(m, d["predicted_decrease"]) for m, d in rec["modules"].items() if d.get("predicted_decrease")]
    mods.sort(key=lambda x: -x[1]["peak"])
    for _, p in mods[:max_modules]:
        ax.plot(p["ranks"], p["decrease"], color=LADDER, alpha=0.35, lw=1)
    if mods:
        ax.plot([], [], color=LADDER, alpha=0.5, label=f"single modules (top {min(len(mods), max_modules)})")
    ax.set_xscale("log", base=2)
    ax.legend(loc="lower right")
    return fig


def pilot(analysis: dict[str, Any], rec: dict[str, Any] | None = None) -> Figure | None:
    """The pilot's measured truncations (``analysis.json`` ``pilot``): held-out loss against LoRA parameters."""
    pd = analysis.get("pilot")
    if not pd:
        return None
    fig, ax = _fig(
        f"Pilot run (rank {pd['settings']['rank']}, {pd['settings']['steps']} steps): measured truncations",
        "LoRA parameters (log scale)",
        "held-out loss",
    )
    uni = pd["uniform"]
    ax.plot([u["params"] for u in uni], [u["eval_loss"] for u in uni], color=LADDER, marker="o", label="uniform rank")
    for u in uni:
        ax.annotate(
            str(u["rank"]), (u["params"], u["eval_loss"]), textcoords="offset points", xytext=(3, 4), fontsize=7
        )
    al = pd["allocations"]
    ax.scatter(
        [a["params"] for a in al],
        [a["eval_loss"] for a in al],
        color=OTHER,
        marker="s",
        s=18,
        zorder=3,
        label="allocations keeping a share of the whitened update",
    )
    el = pd["eval_loss"]
    # rank 0 is far above the truncations: named in the legend, not drawn (it would flatten the curve)
    ax.plot([], [], " ", label=f"rank 0 (trained head, no update): {el['rank0']:.4f}")
    ax.axhline(el["pilot"], color=KNEE, ls="--", lw=1, label=f"whole pilot {el['pilot']:.4f}")
    if rec is not None and rec.get("estimator") == "pilot":
        p = rec["estimators"]["pilot"]["lora_parameters"]
        ax.axvline(p, color=ADVICE, lw=1.5, label=f"advice ({p:,} parameters)")
    ax.set_xscale("log")
    ax.legend(loc="upper right")
    return fig


def quantization(analysis: dict[str, Any]) -> Figure | None:
    """Quantization sensitivity per module, one colour per format.

    Where the analysis measured the modules one by one (``analyze --quant-module-evals``): predicted
    (gᵀδ + ½δᵀHδ) vs measured held-out loss increase per module. Otherwise (the default: the per-module
    quadratic from K-FAC, measured only for the target modules together and the whole model): each module's
    predicted increase, largest first, with the measured increase of the target modules together in the legend.
    """
    q = analysis.get("quantization")
    if not q or not q.get("formats"):
        return None
    measured = {
        f: [d for d in doc["modules"].values() if d.get("measured_loss_increase") is not None]
        for f, doc in q["formats"].items()
    }
    if not any(measured.values()):
        return _quantization_predicted(q["formats"])
    fig, ax = _fig("Quantization sensitivity per module", "predicted loss increase", "measured loss increase")
    allv = []
    for f, rows in measured.items():
        if not rows:
            continue  # this format's modules were not measured one by one
        pred = [d["predicted_loss_increase"] for d in rows]
        meas = [d["measured_loss_increase"] for d in rows]
        sp = q["formats"][f]["spearman"].get("predicted")
        ax.scatter(pred, meas, s=14, label=f"{f} (Spearman {sp:.2f})" if sp is not None else f)
        allv += pred + meas
    lim = max((abs(v) for v in allv if math.isfinite(v)), default=0.0) or 1.0
    ax.plot([-lim, lim], [-lim, lim], color=OTHER, lw=0.8, ls=":", label="predicted = measured")
    ax.set_xscale("symlog", linthresh=lim * 1e-3)
    ax.set_yscale("symlog", linthresh=lim * 1e-3)
    ax.legend(loc="upper left")
    return fig


def _quantization_predicted(formats: dict[str, Any]) -> Figure:
    """Each module's predicted loss increase per format (largest first); the legend holds the measured increase
    of the target modules quantized together, the only per-format measurement of the default analysis."""
    fig, ax = _fig(
        "Quantization sensitivity per module (predicted)", "module (largest predicted first)", "predicted loss increase"
    )
    allv: list[float] = []
    for f, doc in formats.items():
        pred = sorted((float(d["predicted_loss_increase"]) for d in doc["modules"].values()), reverse=True)
        tgt = doc.get("targets", {})
        meas = tgt.get("measured_loss_increase")
        label = f"{f}: targets together measured {meas:+.4f}" if meas is not None else f
        ax.plot(range(1, len(pred) + 1), pred, marker="o", ms=3, lw=1, label=label)
        allv += pred
    lim = max((abs(v) for v in allv if math.isfinite(v)), default=0.0) or 1.0
    ax.set_yscale("symlog", linthresh=lim * 1e-3)
    ax.legend(loc="upper right")
    return fig


def memory(rec: dict[str, Any], measured: dict[str, int] | None = None) -> Figure:
    """The memory forecast by component, beside the measured peak of the advice's training runs."""
    mem = rec["memory"]
    parts = ["runtime", "base_weights", "lora_parameters", "gradients", "optimizer", "activations"]
    fig, ax = _fig(f"Memory: forecast vs measured ({mem['assumptions']['device']})", "", "GiB", size=(7.0, 3.6))
    bottom = 0.0
    for p in parts:
        v = mem[p] / 2**30
        ax.bar(["forecast"], [v], bottom=bottom, label=p.replace("_", " "))
        bottom += v
    for name, b in (measured or {}).items():
        ax.bar([name], [b / 2**30], color=ADVICE)
    ax.legend(loc="upper right", ncol=2)
    return fig


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def ladder(val: dict[str, Any]) -> Figure | None:
    """Held-out loss along the rank ladder (by trainable parameters), the advice's seeds, the knee, competitors."""
    rows = val.get("runs") or []
    rung = sorted((r for r in rows if r["run"].startswith("rank-")), key=lambda r: r["trainable_params"])
    if not rung:
        return None
    fig, ax = _fig(
        "Held-out loss vs trainable parameters", "trainable parameters (log scale)", "held-out loss (best checkpoint)"
    )
    ax.plot(
        [r["trainable_params"] for r in rung],
        [r["eval_loss"] for r in rung],
        color=LADDER,
        marker="o",
        lw=2,
        label="uniform rank ladder",
    )
    for r in rung:
        ax.annotate(
            f"r={r['rank']}",
            (r["trainable_params"], r["eval_loss"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
            color=LADDER,
        )
    adv = [r for r in rows if r["run"].startswith("advice-")]
    ax.scatter(
        [r["trainable_params"] for r in adv],
        [r["eval_loss"] for r in adv],
        color=ADVICE,
        marker="*",
        s=90,
        zorder=5,
        label=f"advice ({len(adv)} seeds)",
    )
    riv = [r for r in rows if r["run"].startswith("rival-")]
    if riv:
        ax.scatter(
            [r["trainable_params"] for r in riv],
            [r["eval_loss"] for r in riv],
            color=LADDER,
            marker="x",
            s=30,
            label="rival, other seeds",
        )
    comp = [c for c in val.get("competitors") or [] if not c["run"].startswith("rank-")]
    for c in comp:
        ax.scatter([c["trainable_params"]], [c["eval_loss"]], color=OTHER, marker="D", s=22)
        ax.annotate(
            c["run"],
            (c["trainable_params"], c["eval_loss"]),
            textcoords="offset points",
            xytext=(4, -9),
            fontsize=7,
            color=OTHER,
        )
    if comp:
        ax.scatter([], [], color=OTHER, marker="D", s=22, label="competitors (first seed)")
    knee = val.get("knee_rank")
    kr = next((r for r in rung if r["rank"] == knee), None)
    if kr is not None:
        ax.axvline(kr["trainable_params"], color=KNEE, ls="--", lw=1, label=f"knee r* = {knee}")
    ax.set_xscale("log")
    ax.legend(loc="upper right")
    ax.set_title(f"Held-out loss vs trainable parameters — verdict: {val['verdict']}")
    return fig


def loss_curves(val: dict[str, Any], curves: dict[str, list[dict[str, float]]]) -> Figure | None:
    """Held-out loss during training for every run (the advice in red, the ladder in blue, others grey)."""
    if not curves:
        return None
    fig, ax = _fig("Held-out loss during training", "step", "held-out loss")
    for name, curve in sorted(curves.items()):
        if not curve:
            continue
        color = ADVICE if name.startswith("advice-") else LADDER if name.startswith(("rank-", "rival-")) else OTHER
        ax.plot(
            [c["step"] for c in curve],
            [c["eval_loss"] for c in curve],
            color=color,
            alpha=0.9 if name.startswith("advice-") else 0.5,
            lw=1.5 if name.startswith("advice-") else 1,
        )
    ax.plot([], [], color=ADVICE, label="advice")
    ax.plot([], [], color=LADDER, label="ladder and rival")
    ax.plot([], [], color=OTHER, label="competitors and methods")
    ax.legend(loc="upper right")
    return fig


def methods(val: dict[str, Any]) -> Figure | None:
    """Quality vs trainable parameters vs peak memory (marker area) for every run at the first seed."""
    rows = [r for r in val.get("runs") or [] if not r["run"].startswith("rival-")]
    if not rows:
        return None
    fig, ax = _fig("Method comparison: quality, size and memory", "trainable parameters (log scale)", "held-out loss")
    mem = np.asarray([max(r.get("peak_memory_bytes") or 0, 1) for r in rows], dtype=float)
    area = 20 + 180 * (mem - mem.min()) / max(mem.max() - mem.min(), 1.0)
    for r, a in zip(rows, area):
        color = ADVICE if r["run"].startswith("advice-") else LADDER if r["run"].startswith("rank-") else OTHER
        ax.scatter([r["trainable_params"]], [r["eval_loss"]], s=a, color=color, alpha=0.6)
        ax.annotate(
            r["run"], (r["trainable_params"], r["eval_loss"]), textcoords="offset points", xytext=(4, 3), fontsize=6
        )
    ax.set_xscale("log")
    ax.text(
        0.99,
        0.02,
        f"marker area: peak memory {mem.min() / 2**20:.0f}–{mem.max() / 2**20:.0f} MiB",
        transform=ax.transAxes,
        ha="right",
        fontsize=7,
        color=OTHER,
    )
    return fig
