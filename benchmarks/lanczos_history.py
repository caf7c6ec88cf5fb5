#!/usr/bin/env python
"""At which HVP the top-k Lanczos run of an analysis meets each tolerance: the cost of ``--tol``, measured.

Rebuilds the joint-scope Hessian operator of an existing analysis folder (its ``analysis_config.json`` and cached
probe head, so the operator is the analysis' own), reruns its top-k Lanczos (same seed, same basis) with a tight
tolerance and records every step's Ritz values and error bounds. Lanczos' path does not depend on the tolerance
until it stops, so one run answers for every tolerance: for each it prints the first HVP at which all k Ritz values
pass the solver's convergence test (``hessrank.engine.lanczos._converged_mask``), and the Ritz values there.

    .venv/bin/python benchmarks/lanczos_history.py runs/real/minilm-movie-all/analysis [--tols 5e-2,2e-2,1e-2]

Used in session 16 to price the MiniLM cases' ``--tol 1e-2`` (reports/validation.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import hessrank.engine.lanczos as L
from hessrank.analysis.config import AnalysisConfig
from hessrank.analysis.run import _setup
from hessrank.engine.curvature import HessianOperator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("analysis", type=Path, help="an analysis folder (analysis_config.json, probe_head.pt)")
    ap.add_argument("--tols", default="5e-2,2e-2,1e-2")
    ap.add_argument("--max-matvecs", type=int, default=60)
    args = ap.parse_args()
    tols = [float(t) for t in args.tols.split(",")]
    raw = json.loads((args.analysis / "analysis_config.json").read_text())["config"]
    cfg = AnalysisConfig.from_dict({**raw, "tol": min(tols) / 10})
    su = _setup(cfg, args.analysis)
    hist: list[tuple[int, np.ndarray, dict[float, bool]]] = []
    step = L._lanczos_step

    def recording(op, run, bar):
        w = step(op, run, bar)
        if len(run.theta) >= run.k:
            passed = {}
            for t in tols:
                run.tol, keep = t, run.tol
                passed[t] = bool(L._converged_mask(run).all())
                run.tol = keep
            hist.append((run.used, run.theta[: run.k].copy(), passed))
        return w

    L._lanczos_step = recording
    op = HessianOperator(su.lm.model, su.loss_fn, su.batches(0), params=su.targets)
    res = L.lanczos(
        op,
        k=cfg.top_k,
        which="LA",
        tol=cfg.tol,
        max_matvecs=args.max_matvecs,
        seed=cfg.seed,
        keep_leading=min(cfg.slq_steps, op.n) if cfg.slq_probes else 0,
    )
    print(
        f"{args.analysis}: top-{cfg.top_k}, {op.n:,} parameters; reference run at tol {cfg.tol:g}: "
        f"{res.num_matvecs} HVPs, eigenvalues {', '.join(f'{x:.4g}' for x in res.eigenvalues)}\n"
    )
    print("| tol | first HVP where all pass | Ritz values there |")
    print("|---:|---:|---|")
    for t in tols:
        at = next(((u, th) for u, th, p in hist if p[t]), None)
        print(f"| {t:g} | {at[0] if at else '-'} | {', '.join(f'{x:.4g}' for x in at[1]) if at else '-'} |")


if __name__ == "__main__":
    main()
