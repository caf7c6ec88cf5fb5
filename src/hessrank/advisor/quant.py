"""Bit-width decision and quantization compensation, from the measurements in ``analysis.json``.

bitsandbytes applies one weight format per model; individual modules can stay unquantized through
``llm_int8_skip_modules``. The candidates are the formats a user can load: 16/32-bit ("none"), 8-bit
(LLM.int8, ``load_in_8bit``), NF4, NF4 with double quantization, FP4. (Blockwise int8 is measured and reported
but is not a weight-loading format of transformers.)

**Decision rule (default: minimise memory under a loss tolerance).** A format is acceptable when its loss
increase is at most ``tolerance × L₀`` (L₀ the held-out loss of the unquantized model; default tolerance 2%). The
loss increase used is the *measured* whole-model increase (every linear layer bitsandbytes would quantize,
dequantized, on held-out batches) — the direct evidence — with the Hessian prediction for the target modules
beside it. If a format misses the tolerance, the most sensitive target modules (by measured per-module increase)
are added to the skip list, one at a time, while the estimated remaining increase (whole − Σ skipped) is above
the tolerance; at most half of the target modules may be skipped, and skipping can remove at most the measured
increase of quantizing the target modules together (the rest comes from layers not measured one by one). A skip
list that cannot reach the tolerance is dropped. Among acceptable (format, skip list) pairs the
one with the smallest forecast memory wins. With a memory budget instead, the pair with the smallest loss increase
among those that fit wins.

**Compensation rank.** For the chosen format, each module's rank needed to win back a share s of its quadratic
quantization cost by a rank-r LoRA correction is read from the K-FAC-weighted (and, for comparison, plain) SVD
curves of δ (:mod:`hessrank.engine.quantization`). s is the share that brings the whole-model increase under the
tolerance: s = 1 − tolerance·L₀ / ΔL (0 when the format is already within tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.quantization import DEFAULT_TOLERANCE, FORMAT_INFO, rank_for_share, skip_list_can_help
from ..errors import HessrankError

#: Formats a user can load with transformers + bitsandbytes, smallest memory last.
LOADABLE: tuple[str, ...] = ("none", "llm.int8", "nf4", "nf4-dq", "fp4")

__all__ = ["DEFAULT_TOLERANCE", "LOADABLE", "FormatOption", "choose", "compensation", "format_options"]


@dataclass
class FormatOption:
    format: str
    skip_modules: list[str]
    loss_increase: float
    measured_whole: float | None
    predicted_targets: float | None
    memory: int
    acceptable: bool
    notes: list[str] = field(default_factory=list)


def bnb_kwargs(fmt: str, skip_modules: list[str], compute_dtype: str = "bfloat16") -> dict[str, Any]:
    """``transformers.BitsAndBytesConfig`` keyword arguments for a format ({} for "none")."""
    if fmt == "none":
        return {}
    if fmt not in FORMAT_INFO or fmt == "int8":
        raise HessrankError(f"format '{fmt}' cannot be loaded by transformers; use one of {', '.join(LOADABLE)}")
    kw = dict(FORMAT_INFO[fmt].bnb)
    if kw.get("load_in_4bit"):
        kw["bnb_4bit_compute_dtype"] = compute_dtype
    if skip_modules:
        kw["llm_int8_skip_modules"] = list(skip_modules)
    return kw


def format_options(
    quant: dict[str, Any],
    tolerance: float,
    memory_of: Callable[[str, list[str]], int],
    head_modules: list[str] | None = None,
) -> list[FormatOption]:
    """Every loadable format with its loss increase, skip list and forecast memory."""
    base = float(quant["base_eval_loss"])
    limit = tolerance * max(base, 1e-12)
    heads = list(head_modules or [])
    opts = [FormatOption("none", [], 0.0, 0.0, 0.0, memory_of("none", heads), True, ["no quantization"])]
    for fmt in LOADABLE[1:]:
        doc = quant["formats"].get(fmt)
        if doc is None:
            continue
        whole = float(doc["whole_model"]["measured_loss_increase"])
        pred = float(doc["targets"]["predicted_loss_increase"])
        per = doc["modules"]
        # skipping target modules can remove at most what quantizing the targets together costs: the rest of
        # the increase comes from linear layers that were not measured one by one
        removable = max(0.0, float(doc["targets"]["measured_loss_increase"]))
        skip: list[str] = []
        removed = 0.0
        est = whole
        notes = []
        unmeasured = any(d.get("measured_loss_increase") is None for d in per.values())
        if unmeasured and skip_list_can_help(whole, removable, limit):
            notes.append(
                "a skip list could help at this tolerance but the analysis did not measure the modules one by one "
                f"(it decided at tolerance {quant.get('tolerance', DEFAULT_TOLERANCE):g}); rerun analyze with "
                "--quant-module-evals all"
            )
        elif unmeasured and whole > limit:
            notes.append("the target modules account for too little of the increase for a skip list to help")
        order = [] if unmeasured else sorted(per, key=lambda m: -float(per[m]["measured_loss_increase"]))
        while order and est > limit and len(skip) < len(per) // 2 and removed < removable:
            m = order[len(skip)]
            gain = float(per[m]["measured_loss_increase"])
            if gain <= 0:
                break
            skip.append(m)
            removed = min(removable, removed + gain)
            est = whole - removed
        if skip and est > limit:
            skip = []  # skipping does not reach the tolerance: not worth the memory
            est = whole
            notes.append("the target modules account for too little of the increase for a skip list to help")
        if skip:
            notes.append(
                f"keeps {len(skip)} most sensitive module(s) unquantized; estimated increase {whole:.4g} -> {est:.4g} "
                f"(at most the {removable:.4g} the target modules cost together)"
            )
        opts.append(FormatOption(fmt, skip, est, whole, pred, memory_of(fmt, heads + skip), est <= limit, notes))
    return opts


def choose(options: list[FormatOption], memory_budget: int | None) -> FormatOption:
    """Smallest memory among acceptable options; with a budget, smallest loss increase among those that fit."""
    if memory_budget is not None:
        fits = [o for o in options if o.memory <= memory_budget]
        if not fits:
            smallest = min(options, key=lambda o: o.memory)
            raise HessrankError(
                f"memory budget {memory_budget / 2**30:.2f} GiB is below every option; the smallest forecast is "
                f"{smallest.memory / 2**30:.2f} GiB ({smallest.format}, rank-1 adapters)"
            )
        return min(fits, key=lambda o: (o.loss_increase, o.memory))
    ok = [o for o in options if o.acceptable]
    return min(ok, key=lambda o: o.memory)


def compensation(
    quant: dict[str, Any], fmt: str, tolerance: float, loss_increase: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per module: ranks that recover the needed share of the quadratic quantization cost (K-FAC and plain).

    ``loss_increase`` is the chosen option's increase (after any skip list); default the whole-model one.
    """
    if fmt == "none" or fmt not in quant["formats"]:
        return {}
    doc = quant["formats"][fmt]
    base = float(quant["base_eval_loss"])
    whole = float(doc["whole_model"]["measured_loss_increase"]) if loss_increase is None else float(loss_increase)
    need = max(0.0, 1.0 - tolerance * base / whole) if whole > 0 else 0.0
    out = {}
    for m, d in doc["modules"].items():
        c = d["compensation"]
        out[m] = {
            "share_needed": need,
            "rank_kfac": rank_for_share(c, "kfac_share", need) if need > 0 else 0,
            "rank_plain": rank_for_share(c, "plain_share", need) if need > 0 else 0,
            "rank_kfac_90": rank_for_share(c, "kfac_share", 0.9),
            "rank_plain_90": rank_for_share(c, "plain_share", 0.9),
        }
    return out
