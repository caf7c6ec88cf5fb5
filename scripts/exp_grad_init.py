#!/usr/bin/env python
"""Experiment (issue 11): does a gradient-aligned LoRA A initialisation let a small rank reach what a larger one does?

Hypothesis (Adam + rank-stable scaling): with A random (Kaiming) and B = 0, the first updates ΔW = s·ΔB·A lie in
the random row space of A, which holds a share ≈ r/n of the gradient's energy, so a small rank descends slower at
the same update norm. Setting A's rows to the top-r right singular vectors of the module's gradient at θ₀
(G = Σ_tokens δ_out x_inᵀ over a few training batches; B stays 0, so the model at step 0 is unchanged) puts the
update in the gradient's leading subspace from step 1 (the A half of LoRA-GA, Wang et al. 2024, arXiv:2407.05000).

    .venv/bin/python scripts/exp_grad_init.py --init grad --out runs/exp/gi-r8 -- <hessrank train flags>
    .venv/bin/python scripts/exp_grad_init.py --init grad --out runs/exp/gi-r8 --from-run RUN   # RUN's exact config
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hessrank.trainer.train as T


def align_lora_a(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict:
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    grads: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}
    hooks = []

    def fwd(name):
        def hook(mod, args, out):
            x = args[0].detach()
            xs[name] = x

            def bwd(g, name=name):
                gg = torch.einsum("...m,...n->mn", g.float(), xs[name].float())
                grads[name] = grads.get(name, 0) + gg

            out.register_hook(bwd)

        return hook

    for n, m in layers.items():
        hooks.append(m.register_forward_hook(fwd(n)))
    model.eval()
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    info = {}
    with torch.no_grad():
        for n, m in layers.items():
            A = m.lora_A["default"].weight  # (r, n)
            r = A.shape[0]
            G = grads[n]  # (m, n)
            _, S, Vh = torch.linalg.svd(G, full_matrices=False)
            new = Vh[:r] * (A.norm() / (r**0.5))  # orthonormal rows, each with A's mean row norm
            A.copy_(new.to(A.dtype))
            info[n] = float((S[:r] ** 2).sum() / (S**2).sum())
    model.train()
    return info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", choices=["default", "grad"], required=True)
    ap.add_argument("--init-batches", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--from-run", help="reuse this run folder's train_config.json (only the init differs)")
    ap.add_argument("--set", action="append", default=[], help="with --from-run: override a field, KEY=JSON")
    args, rest = ap.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    from hessrank.cli import main as cli_main

    orig = T._build
    shares: dict[str, float] = {}

    def patched(c):
        run = orig(c)
        if args.init == "grad":
            bs = c.batch_size
            batches = [run.enc.collate(run.train_items[i * bs : (i + 1) * bs]) for i in range(args.init_batches)]
            shares.update(align_lora_a(run.model, batches, run.device))
        return run

    T._build = patched
    if args.from_run:
        from hessrank.io import read_json

        d = read_json(Path(args.from_run, "train_config.json"))["config"]
        for kv in args.set:
            k, _, v = kv.partition("=")
            d[k] = json.loads(v)
        cfg = T.TrainConfig.from_dict(d)
        T.train(cfg, args.out, progress=False)
        rc = 0
    else:
        rc = cli_main(["train", *rest, "--out", args.out, "--quiet"])
    m = json.loads(Path(args.out, "metrics.json").read_text())
    ti = m["train_info"]
    print(
        json.dumps(
            {
                "init": args.init,
                "eval_loss": ti["metrics"]["eval_loss"],
                "best_step": ti["best_step"],
                "curve": [round(c["eval_loss"], 4) for c in ti.get("eval_curve") or []],
                "energy_share_min": min(shares.values()) if shares else None,
                "energy_share_max": max(shares.values()) if shares else None,
            }
        )
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
