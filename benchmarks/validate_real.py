#!/usr/bin/env python
"""Advice vs ladder on real data: analyze -> recommend -> validate for one named case, then print the table.

    .venv/bin/python benchmarks/validate_real.py minilm-sst2        [--out runs/real]
    .venv/bin/python benchmarks/validate_real.py minilm-agnews
    .venv/bin/python benchmarks/validate_real.py smollm2-movie
    .venv/bin/python benchmarks/validate_real.py smollm2-gsm8k

Each stage resumes, so an interrupted case continues where it stopped. The settings of each case are printed
with its results and kept in reports/validation.md together with the command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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
            "128",
            "--slq-probes",
            "2",
            "--slq-steps",
            "16",
            "--quant-formats",
            "llm.int8,nf4,nf4-dq,fp4",
            "--quant-exact",
            "no",
            "--quant-eval-batches",
            "8",
        ],
        "recommend": ["--batch-size", "8", "--seq-len", "128"],
        "validate": [
            "--steps",
            "150",
            "--eval-every",
            "25",
            "--patience",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "5e-4",
            "--seeds",
            "1",
            "--ladder",
            "0.5,1,2,4",
            "--max-train",
            "2000",
            "--max-eval",
            "200",
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
            "8",
        ],
        "recommend": ["--batch-size", "4", "--seq-len", "256"],
        "validate": [
            "--steps",
            "120",
            "--eval-every",
            "30",
            "--patience",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "3e-4",
            "--seeds",
            "1",
            "--ladder",
            "0.5,1,2,4",
            "--max-train",
            "2000",
            "--max-eval",
            "100",
            "--formats",
            "",
            "--methods",
            "",
        ],
    },
}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--out", default="runs/real")
    args = ap.parse_args()
    c = CASES[args.case]
    out = Path(args.out) / args.case
    hr = [sys.executable, "-m", "hessrank"]
    t0 = time.time()
    run([*hr, "analyze", *c["analyze"], "--out", str(out / "analysis"), "--quiet"])
    t1 = time.time()
    run([*hr, "recommend", str(out / "analysis"), *c["recommend"]])
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
