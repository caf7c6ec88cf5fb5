"""``hessrank report``: the analysis, the advice and its validation as one page (HTML and Markdown).

Reads only the documented files (``docs/schemas.md``), as the typed results of :mod:`hessrank.results` (a damaged
file is named with its field): ``analysis.json`` (+ ``analysis.npz``),
``recommendation.json`` beside it, and optionally ``validation.json`` with its ``runs/*/metrics.json``. Writes

* ``report.html`` — self-contained: every figure is an embedded PNG (``data:`` URI), the style is inline, nothing
  is fetched, so it opens from disk or as an e-mail attachment;
* ``report.md`` — the same text and tables, figures as PNG files in ``report_files/``.

Both are written atomically; a folder's existing ``report.*`` files are replaced (they are hessrank's own output).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HessrankError
from ..io import atomic_write, read_json, read_npz
from ..results import (
    AnalysisResult,
    Recommendation,
    ValidationResult,
    competitor_notes,
    load_analysis_result,
    load_recommendation,
    load_validation,
    minus_advice_text,
)
from . import plots


@dataclass
class Sources:
    """The documents a report is made from, typed (:mod:`hessrank.results`); each training run's ``metrics.json``
    (``hessrank.metrics/1``) stays a plain dict."""

    analysis_dir: Path
    analysis: AnalysisResult
    arrays: dict[str, np.ndarray]
    rec: Recommendation | None
    val: ValidationResult | None
    val_dir: Path | None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def find_sources(path: str | Path, validation: str | Path | None = None) -> Sources:
    """Locate the documents: ``path`` is an analysis folder, or a folder holding ``analysis/`` (and
    ``validation/``), as ``make demo`` and ``benchmarks/validate_real.py`` write them."""
    p = Path(path)
    if not p.exists():
        raise HessrankError(f"{p}: no such folder (give an analysis folder, or one holding analysis/ and validation/)")
    an_dir = p if (p / "analysis.json").exists() else p / "analysis"
    if not (an_dir / "analysis.json").exists():
        raise HessrankError(f"{p}: holds no analysis.json (nor analysis/analysis.json); run hessrank analyze first")
    analysis = load_analysis_result(an_dir / "analysis.json")
    arrays = read_npz(an_dir / "analysis.npz") if (an_dir / "analysis.npz").exists() else {}
    rec_path = an_dir / "recommendation.json"
    rec = load_recommendation(rec_path) if rec_path.exists() else None
    vdir = Path(validation) if validation is not None else (p / "validation" if p != an_dir else None)
    if validation is not None and not (Path(validation) / "validation.json").exists():
        raise HessrankError(f"{validation}: holds no validation.json (run hessrank validate first)")
    val = None
    metrics: dict[str, dict[str, Any]] = {}
    if vdir is not None and (vdir / "validation.json").exists():
        val = load_validation(vdir / "validation.json")
        for row in val.runs:
            # the run's own folder; an extension retrained from the start lives in runs/<name>@<steps>
            mf = vdir / row.get("folder", f"runs/{row['run']}") / "metrics.json"
            if mf.exists():
                metrics[row["run"]] = read_json(mf, schema="hessrank.metrics/1")
    return Sources(an_dir, analysis, arrays, rec, val, vdir if val is not None else None, metrics)


@dataclass
class Figure:
    key: str
    title: str
    png: bytes
    caption: str


def _plain(src: Sources) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """The documents as :mod:`hessrank.report.plots` takes them: the dicts the public API returns."""
    return (
        src.analysis.to_dict(),
        None if src.rec is None else src.rec.to_dict(),
        None if src.val is None else src.val.to_dict(),
    )


def _advice_peaks(metrics: dict[str, dict[str, Any]]) -> dict[str, int]:
    """{advice run: its measured peak memory in bytes} from the runs' ``metrics.json``."""
    return {n: int(m["train_info"]["peak_memory_bytes"]) for n, m in metrics.items() if n.startswith("advice-")}


def _figures(src: Sources) -> list[Figure]:
    an, rec, val = _plain(src)
    out: list[Figure] = []

    def add(key: str, title: str, make: Callable[[], Any], caption: str) -> None:
        fig = make()
        if fig is not None:
            out.append(Figure(key, title, plots.png(fig), caption))

    add(
        "eigenvalues",
        "Top eigenvalues",
        lambda: plots.eigenvalues(an),
        "Lanczos top-k eigenvalues of each analysed scope; error bars: spread over repeats (or Lanczos' error bound).",
    )
    add(
        "density",
        "Spectral density",
        lambda: plots.spectral_density(an, src.arrays),
        "Stochastic Lanczos quadrature estimate of the whole spectrum (Gaussian-broadened).",
    )
    if rec is not None:
        advice = src.rec.modules if src.rec is not None else {}
        mods = list(advice)
        ne = {m: (d.estimators or {}).get("n_eff_topk") or 0.0 for m, d in advice.items()}
        add(
            "n_eff",
            "Effective dimension per module",
            lambda: plots.heatmap(mods, ne, "Effective dimension N_eff per module (top-k)", "N_eff", fmt="{:.2g}"),
            "N_eff = Σᵢ λᵢ/(λᵢ+z)·massᵢ,ₘ of the top-k eigenvalues attributed to each module (z = 0.01·λ_max).",
        )
        ranks = {m: float(d.rank) for m, d in advice.items()}
        add(
            "ranks",
            "Advised rank per module",
            lambda: plots.heatmap(mods, ranks, "Advised LoRA rank per module", "rank", fmt="{:.0f}"),
            "0 = no adapter.",
        )
        gains = {m: (d.predicted_decrease or {}).get("peak", 0.0) for m, d in advice.items()}
        if any(gains.values()):
            add(
                "gains",
                "Predicted gain per module",
                lambda: plots.heatmap(
                    mods, gains, "Predicted loss decrease per module (K-FAC, best rank)", "decrease", log=True
                ),
                "The largest cross-fitted predicted decrease of each module's K-FAC rank curve, in loss units.",
            )
        add(
            "rank_curve",
            "Predicted decrease vs rank",
            lambda: plots.rank_curves(rec),
            "Sum over modules of the predicted decrease at a uniform rank, and the largest modules' own curves.",
        )
    add(
        "pilot",
        "Pilot run",
        lambda: plots.pilot(an, rec),
        "Opt-in (analyze --pilot-steps): the pilot's update truncated in K-FAC-whitened coordinates to each uniform "
        "rank and to allocations keeping a share of its whitened energy, each truncation's held-out loss measured.",
    )
    add(
        "quantization",
        "Quantization sensitivity",
        lambda: plots.quantization(an),
        "Per module and format: the second-order prediction gᵀδ + ½δᵀHδ against the measured held-out increase.",
    )
    if rec is not None:
        measured = _advice_peaks(src.metrics)
        add(
            "memory",
            "Memory",
            lambda: plots.memory(rec, measured),
            "Forecast components (hessrank.advisor.memory) against the measured peak of each advice run "
            "(peak RSS on CPU, max allocated on CUDA).",
        )
    if val is not None:
        add(
            "ladder",
            "Rank ladder",
            lambda: plots.ladder(val),
            "Every run judged at its best held-out checkpoint; the knee is the smallest rung within the band of "
            + (
                "the run best on the selection half."
                if val.get("knee_reference_loss") is not None
                else "the best run."  # a validation written before session 24
            ),
        )
        curves = {n: m["train_info"].get("eval_curve") or [] for n, m in src.metrics.items()}
        add(
            "curves",
            "Loss curves",
            lambda: plots.loss_curves(val, curves),
            "transformers' held-out evaluations during training (the early-stopping signal).",
        )
        add(
            "methods",
            "Method comparison",
            lambda: plots.methods(val),
            "First seed of every run: held-out loss against trainable parameters; marker area is peak memory.",
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# text blocks (shared by HTML and Markdown: lists of rows)
# ----------------------------------------------------------------------------------------------------------


def _setup_rows(src: Sources) -> list[tuple[str, str]]:
    an = src.analysis
    c, model, cost = an.config, an.model, an.cost or {}
    rows = [
        ("model", f"{model['name']} ({model['class']}, {model['num_parameters']:,} parameters)"),
        ("task", model["task"]),
        ("data", f"{an.data['source']} ({an.data['train_examples']:,} training examples)"),
        ("analysis point", an.analysis_point["kind"]),
        ("target modules", f"{c['modules']} ({len(an.modules)} modules)"),
        (
            "analysis",
            f"top-{c['top_k']} Lanczos (tol {c['tol']}), {c['num_batches']} × {c['batch_size']} examples, "
            f"max length {c['max_length']}, K-FAC on {c.get('kfac_batches', '-')} batches, seed {c['seed']}",
        ),
        ("cost", f"{cost['hvp_total']} HVPs, {cost.get('seconds_units', 0):.0f} s of compute"),
        ("versions", ", ".join(f"{k} {v}" for k, v in (an.versions or {}).items())),
    ]
    return rows


def _summary_rows(src: Sources) -> list[tuple[str, str]]:
    rec, val = src.rec, src.val
    rows: list[tuple[str, str]] = []
    if rec is not None:
        active = [d.rank for d in rec.adapted.values()]
        conf = rec.confidence or {}
        rows += [
            (
                "advice",
                f"global rank {rec.global_rank}; ranks {min(active)}–{max(active)} on {len(active)} of "
                f"{len(rec.modules)} modules; {rec.trainable_parameters:,} trainable parameters",
            ),
            ("bit width", (rec.quantization or {})["format"]),
            ("memory forecast", (rec.memory or {})["total_human"]),
            ("confidence", f"{conf['level']} — {conf.get('note', '')}"),
        ]
    if val is not None:
        rows.append(("verdict", f"{val.verdict} — {val.why}"))
        c = val.cost or {}
        if c.get("analysis_seconds") and c["ladder_train_time"]:
            rows.append(
                (
                    "cost",
                    f"analysis {c['analysis_seconds']:.0f} s = "
                    f"{c['analysis_seconds'] / c['ladder_train_time']:.1%} of the ladder's training",
                )
            )
    return rows


def _module_table(rec: Recommendation) -> tuple[list[str], list[list[str]]]:
    head = ["module", "shape", "rank", "rule", "predicted decrease at rank", "best", "resolved", "reasons"]
    rows = []
    for m, d in rec.modules.items():
        p = d.predicted_decrease or {}
        at = max([0.0] + [x for r, x in zip(p.get("ranks", []), p.get("decrease", [])) if r <= d.rank])
        rs = p.get("resolved_share")
        rows.append(
            [
                m,
                "×".join(str(x) for x in d.shape),
                str(d.rank),
                d.rank_rule or "-",
                f"{at:.3g}" if p else "-",
                f"{p['peak']:.3g}" if p else "-",
                f"{rs:.0%}" if rs else "-",
                " ".join(d.reasons or ()),
            ]
        )
    return head, rows


def _competitor_table(val: ValidationResult) -> tuple[list[str], list[list[str]]]:
    head = ["run", "method", "rank", "trainable params", "held-out loss", "minus advice", "winner"]
    rows = [
        [
            r["run"],
            r["method"],
            r["ranks"],
            f"{r['trainable_params']:,}",
            f"{r['eval_loss']:.4f}",
            minus_advice_text(r),
            r["winner"],
        ]
        for r in val.competitors or ()
    ]
    return head, rows


def _runs_table(val: ValidationResult) -> tuple[list[str], list[list[str]]]:
    head = [
        "run",
        "format",
        "rank",
        "seed",
        "held-out loss",
        "accuracy",
        "trainable params",
        "steps",
        "best step",
        "plateau",
        "train s",
    ]
    rows = []
    for r in sorted(val.runs, key=lambda r: r["run"]):
        rows.append(
            [
                r["run"],
                r["quantization"],
                r["ranks"],
                str(r["seed"]),
                f"{r['eval_loss']:.4f}",
                "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                f"{r['trainable_params']:,}",
                str(r["steps"]),
                str(r["best_step"]),
                "yes" if r["plateaued"] else "no",
                f"{r['train_time']:.0f}",
            ]
        )
    return head, rows


def _quant_table(rec: Recommendation) -> tuple[list[str], list[list[str]]]:
    head = ["format", "loss increase", "acceptable", "memory", "kept unquantized"]
    rows = [
        [
            f,
            f"{c['loss_increase']:+.4g}",
            "yes" if c["acceptable"] else "no",
            c["memory_human"],
            ", ".join(c["skip_modules"]) or "-",
        ]
        for f, c in (rec.quantization or {})["candidates"].items()
    ]
    return head, rows


# ----------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}
.kv td:first-child{font-weight:600;white-space:nowrap}figure{margin:1em 0}figure img{max-width:100%;
border:1px solid #eee}figcaption{font-size:.85em;color:#555}.verdict{font-size:1.1em;padding:.6em;
background:#fff6e5;border-left:4px solid #f0a020}
"""


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _kv_html(rows: list[tuple[str, str]]) -> str:
    return (
        '<table class="kv">'
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _sections(src: Sources) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The page as (section title, blocks); a block is ("kv", rows) | ("table", (head, rows)) | ("figure", key) |
    ("lines", [str]) | ("text", str)."""
    rec, val = src.rec, src.val
    secs: list[tuple[str, list[tuple[str, Any]]]] = [
        ("Summary", [("kv", _summary_rows(src))]),
        ("Setup", [("kv", _setup_rows(src))]),
        ("Spectrum", [("figure", "eigenvalues"), ("figure", "density"), ("figure", "n_eff")]),
    ]
    if rec is not None:
        secs.append(
            (
                "Recommendation",
                [
                    ("figure", "ranks"),
                    ("figure", "gains"),
                    ("figure", "rank_curve"),
                    ("table", _module_table(rec)),
                    ("lines", list(rec.explanation or ())),
                ],
            )
        )
        secs.append(("Quantization", [("figure", "quantization"), ("table", _quant_table(rec))]))
        secs.append(("Memory", [("figure", "memory")]))
    if val is not None:
        secs.append(
            (
                "Validation",
                [
                    ("text", f"Verdict: {val.verdict} — {val.why}."),
                    ("figure", "ladder"),
                    ("figure", "curves"),
                    ("figure", "methods"),
                    (
                        "text",
                        "Who wins at which budget (first seed, or paired by seed where a run has more; winner: "
                        "better by more than the band):",
                    ),
                    ("table", _competitor_table(val)),
                    *(("text", n) for n in competitor_notes(val.competitors or ())),
                    *(
                        [("text", "Not trained on their own: " + "; ".join(f"{k}: {v}" for k, v in nt.items()) + ".")]
                        if (nt := val.extra.get("competitors_not_trained"))
                        else []
                    ),
                    ("table", _runs_table(val)),
                ],
            )
        )
    return secs


def _title(an: AnalysisResult) -> str:
    return f"hessrank report — {an.model['name']} on {Path(an.data['source']).name}"


def render_html(src: Sources, figures: list[Figure]) -> str:
    figs = {f.key: f for f in figures}
    title = _title(src.analysis)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for name, blocks in _sections(src):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        for kind, x in blocks:
            if kind == "kv":
                parts.append(_kv_html(x))
            elif kind == "table":
                parts.append(_html_table(*x))
            elif kind == "lines":
                parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in x) + "</ul>")
            elif kind == "text":
                cls = ' class="verdict"' if x.startswith("Verdict") else ""
                parts.append(f"<p{cls}>{html.escape(x)}</p>")
            elif kind == "figure" and x in figs:
                f = figs[x]
                data = base64.b64encode(f.png).decode()
                parts.append(
                    f'<figure><img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
                )
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(src: Sources, figures: list[Figure], files_dir: str = "report_files") -> str:
    figs = {f.key: f for f in figures}
    lines = [f"# {_title(src.analysis)}", ""]
    for name, blocks in _sections(src):
        lines += [f"## {name}", ""]
        for kind, x in blocks:
            if kind == "kv":
                lines += [_md_table(["", ""], [[f"**{k}**", v] for k, v in x]), ""]
            elif kind == "table":
                lines += [_md_table(*x), ""]
            elif kind == "lines":
                lines += [f"- {line}" for line in x] + [""]
            elif kind == "text":
                lines += [x, ""]
            elif kind == "figure" and x in figs:
                lines += [f"![{figs[x].title}]({files_dir}/{x}.png)", "", f"*{figs[x].caption}*", ""]
    return "\n".join(lines)


def write_report(path: str | Path, validation: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Write ``report.html``, ``report.md`` and ``report_files/*.png`` into ``out`` (default: ``path``)."""
    src = find_sources(path, validation)
    figures = _figures(src)
    dest = Path(out) if out is not None else Path(path)
    dest.mkdir(parents=True, exist_ok=True)
    files = dest / "report_files"
    files.mkdir(exist_ok=True)
    for f in figures:
        atomic_write(files / f"{f.key}.png", lambda fh, f=f: fh.write(f.png), mode="wb")
    page = render_html(src, figures)
    atomic_write(dest / "report.html", lambda fh: fh.write(page))
    md = render_markdown(src, figures)
    atomic_write(dest / "report.md", lambda fh: fh.write(md))
    summary = {
        "html": str(dest / "report.html"),
        "markdown": str(dest / "report.md"),
        "figures": [f.key for f in figures],
    }
    atomic_write(dest / "report_files" / "index.json", lambda fh: json.dump(summary, fh, indent=1))
    return summary
