"""How well each per-module quantization estimate ranks the modules, on the archived validation analyses.

For every case under ``reports/real/*/analysis/analysis.json`` whose quantization measured the modules one by one
with random-sign probes (the analyses written before session 15), prints the Spearman correlation with the
measured held-out increase of: gᵀδ + ½·(random-sign quadratic), gᵀδ + ½·(K-FAC quadratic), gᵀδ alone, and HAWQ's
trace proxy. This is the measurement behind the default ``--quant-sign-probes 0`` (docs/advisor.md).

    .venv/bin/python benchmarks/quant_rankers.py [--root reports/real]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hessrank.engine.quantization import spearman


def rows(root: Path) -> list[tuple[str, str, int, list[float | None]]]:
    out = []
    for path in sorted(root.glob("*/analysis/analysis.json")):
        q = json.loads(path.read_text()).get("quantization")
        if not q:
            continue
        for fmt, doc in q["formats"].items():
            per = list(doc["modules"].values())
            if any(d.get("measured_loss_increase") is None or d.get("quadratic_signs") is None for d in per):
                continue
            meas = [d["measured_loss_increase"] for d in per]
            g = [d["gradient_term"] for d in per]
            cols = [
                spearman([a + 0.5 * d["quadratic_signs"] for a, d in zip(g, per)], meas),
                spearman([a + 0.5 * d["quadratic_kfac"] for a, d in zip(g, per)], meas),
                spearman(g, meas),
                spearman([d["hawq_proxy"] for d in per], meas),
            ]
            out.append((path.parts[-3], fmt, len(per), cols))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="reports/real", type=Path)
    args = ap.parse_args()
    print("| case | format | modules | signs | K-FAC | gradient only | HAWQ |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for case, fmt, n, cols in rows(args.root):
        cells = " | ".join("—" if c is None else f"{c:+.2f}" for c in cols)
        print(f"| {case} | {fmt} | {n} | {cells} |")


if __name__ == "__main__":
    main()
