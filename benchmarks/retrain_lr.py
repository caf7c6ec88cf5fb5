"""Retrain runs of a validation with another learning rate, and print them beside the originals (a diagnostic).

    .venv/bin/python benchmarks/retrain_lr.py VAL --runs advice-s0,rank-32 --lr 4e-3 --out runs/lr4e-3

VAL is a ``hessrank validate`` output folder (or its archive under reports/real); each named run's configuration is
read as validate wrote it (``runs/<name>/train_config.json``, else the copy in its ``metrics.json``), only ``lr`` is
replaced, and the run is trained into ``OUT/<name>`` (resumable) with :func:`hessrank.trainer.train.train`. The
table gives both runs' held-out loss on the reported half, best step and plateau state. Session 19 used it on
GSM8K: does a run's distance from another come from the learning rate the recipe gives both?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from hessrank.trainer.train import TrainConfig, train


def _cells(ti: dict) -> str:
    """Held-out loss, best step, steps run and plateau state of one run's ``train_info``."""
    settled = "yes" if ti["plateaued"] else "no"
    return f"{ti['metrics']['eval_loss']:.4f} | {ti['best_step']} | {ti['steps']} | {settled}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("validation", type=Path, help="a hessrank validate output folder")
    ap.add_argument("--runs", required=True, help="comma-separated run names under VAL/runs")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [
        f"| run | lr | held-out loss | best step | steps | plateau | lr {args.lr:g}: held-out loss | best step | "
        "steps | plateau |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name in args.runs.split(","):
        folder = args.validation / "runs" / name
        if not (folder / "metrics.json").is_file():
            raise SystemExit(f"{folder}: no metrics.json (not a finished run of this validation)")
        m = json.loads((folder / "metrics.json").read_text())
        # the run's own config file; an archived run (reports/real keeps metrics.json only) carries it in run_info
        made = folder / "train_config.json"
        cfg = TrainConfig.from_dict(
            json.loads(made.read_text())["config"] if made.is_file() else m["run_info"]["train_config"]
        )
        after = train(dataclasses.replace(cfg, lr=args.lr), args.out / name, resume=True, progress=True)["train_info"]
        rows.append(f"| {name} | {cfg.lr:g} | {_cells(m['train_info'])} | {_cells(after)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
