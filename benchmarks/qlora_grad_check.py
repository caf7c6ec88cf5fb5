#!/usr/bin/env python
"""Does every LoRA tensor receive a gradient on quantized weights? One training step per format, on any device.

bitsandbytes' CPU weight repacking once dropped gradients silently (see ``hessrank.models.fix_bnb_cpu``);
this script checks the property itself on a real model and batch, for each weight format, and prints a table:
LoRA tensors, how many received a finite non-zero gradient, the loss, the loss after one AdamW step on the same
batch (it must fall), and peak memory (CUDA max allocated on a GPU, process RSS on CPU).

    .venv/bin/python benchmarks/qlora_grad_check.py                       # CPU, MiniLM-L6 + SST-2
    python3 benchmarks/qlora_grad_check.py --device cuda --json out.json  # on a GPU

Model: MiniLM-L6 with a new 2-class head (kept in 32-bit and trained, as PEFT's ``modules_to_save``), LoRA
rank 8 on every query and value projection; one batch of 16 SST-2 sentences x 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

FORMATS = ["none", "llm.int8", "nf4", "nf4-dq", "fp4"]


def with_gradient(params: list[torch.Tensor]) -> int:
    """How many of ``params`` hold a finite, non-zero gradient."""
    return sum(1 for p in params if p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0)


def one_format(fmt: str, device: torch.device, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from hessrank.data import Encoder, analysis_batches, load_dataset, split_dataset
    from hessrank.engine.tasks import loss_fn_for
    from hessrank.models import load_model

    quant = {"llm.int8": "int8", "nf4-dq": "nf4"}.get(fmt, fmt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model("minilm-l6", "seq-cls", quantization=quant, double_quant=fmt == "nf4-dq", device=device)
        model = get_peft_model(
            lm.model,
            LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        )
    model.train()
    train, _ = split_dataset(load_dataset("sst2"), 0.1, seed=seed)
    enc = Encoder(lm.tokenizer, "seq-cls", 64, dataset=train)
    batch = {k: v.to(device) for k, v in analysis_batches(train, enc, 1, 16, seed=seed)[0].items()}
    loss_fn = loss_fn_for("seq-cls")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(seed)
    t = time.perf_counter()
    loss = loss_fn(model, batch)
    loss.backward()
    with_grad = with_gradient(list(lora.values()))
    # LoRA's B starts at zero, so A's gradient is zero before the first step; take the step and look again.
    opt.step()
    opt.zero_grad()
    loss2 = loss_fn(model, batch)
    loss2.backward()
    with_grad_after = with_gradient(list(lora.values()))
    opt.step()
    with torch.no_grad():
        loss3 = loss_fn(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        from hessrank.trainer.train import peak_rss_bytes

        peak, kind = peak_rss_bytes() / 2**20, "rss"
    lin = type(model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer).__name__
    return {
        "format": fmt,
        "base_layer": lin,
        "lora_tensors": len(lora),
        "with_grad_step0": with_grad,
        "with_grad_step1": with_grad_after,
        "loss0": loss.item(),
        "loss1": loss2.item(),
        "loss2": loss3.item(),
        "seconds": time.perf_counter() - t,
        "peak_mb": peak,
        "peak_kind": kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# qlora_grad_check: MiniLM-L6 + LoRA r=8 on query,value; SST-2 batch 16x64; device {device} ({name})\n")
    print("| format | base layer | LoRA tensors | with grad (step 0 / 1) | loss 0 → 1 → 2 | peak MB |")
    print("|---|---|---:|---:|---|---:|")
    rows = []
    failed = []
    for fmt in args.formats.split(","):
        try:
            r = one_format(fmt, device, args.seed)
        except Exception as e:  # report and go on: one format's failure must not hide the others'
            r = {"format": fmt, "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"| {fmt} | error: {r['error']} | | | | |")
            failed.append(fmt)
        else:
            if r["with_grad_step1"] < r["lora_tensors"] or not r["loss2"] < r["loss0"]:
                failed.append(fmt)
            print(
                f"| {fmt} | {r['base_layer']} | {r['lora_tensors']} | {r['with_grad_step0']} / "
                f"{r['with_grad_step1']} | {r['loss0']:.4f} → {r['loss1']:.4f} → {r['loss2']:.4f} | "
                f"{r['peak_mb']:.0f} ({r['peak_kind']}) |"
            )
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        "\nStep 0: only the B matrices (and the head) can have a gradient, since B = 0 at initialisation; "
        "step 1: every LoRA tensor must."
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "device_name": name, "rows": rows}, indent=2))
    if failed:
        why = "a LoRA tensor without a gradient, a loss that did not fall, or an error"
        raise SystemExit(f"FAILED: {', '.join(failed)}: {why}")


if __name__ == "__main__":
    main()
