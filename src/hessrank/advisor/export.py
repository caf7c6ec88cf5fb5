"""Configs other tools accept, written from a recommendation.

* ``lora_config.json`` — ``peft.LoraConfig(**json.load(f))`` (``rank_pattern`` / ``alpha_pattern`` keyed by
  full module names, regex-escaped; PEFT matches keys with ``re.match(rf"(.*\\.)?({key})$", name)``).
* ``bnb_config.json`` — ``transformers.BitsAndBytesConfig(**json.load(f))`` (``{}`` when no quantization).
* ``axolotl.yaml`` — keys from axolotl's schema (``src/axolotl/utils/schemas/peft.py``): ``adapter``, ``lora_r``,
  ``lora_alpha``, ``peft_use_rslora``, ``lora_dropout``, ``lora_target_modules``, ``load_in_8bit``/``load_in_4bit``,
  ``lora_modules_to_save``, ``bnb_config_kwargs`` (4-bit path only), and ``lora_rank_pattern`` /
  ``lora_alpha_pattern`` (recent axolotl versions only; older ones drop unknown keys).
* ``llamafactory.yaml`` — keys from LLaMA-Factory's ``finetuning_args.py`` / ``model_args.py``:
  ``finetuning_type: lora``, ``lora_rank``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``lora_target``
  (comma-separated), ``additional_target``, ``quantization_bit``, ``quantization_method: bnb``, ``quantization_type``,
  ``double_quantization``. LLaMA-Factory has no per-module rank: the fragment carries the global rank.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_write, write_json


def lora_config_dict(rec: dict[str, Any], dropout: float = 0.05) -> dict[str, Any]:
    """The ``peft.LoraConfig`` keyword arguments of a recommendation."""
    mods = {m: d for m, d in rec["modules"].items() if d["rank"] > 0}
    r = int(rec["global_rank"])
    lora = rec.get("lora") or {}  # older recommendations: α = 2r per module, plain α/r scaling
    rs = bool(lora.get("use_rslora", False))
    alpha = lora["lora_alpha"] if rs else 2 * r
    rank_pattern = {re.escape(m): int(d["rank"]) for m, d in mods.items() if int(d["rank"]) != r}
    alpha_pattern = {re.escape(m): d["alpha"] for m, d in mods.items() if float(d["alpha"]) != float(alpha)}
    cfg: dict[str, Any] = {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rs,
        "lora_dropout": dropout,
        "target_modules": sorted(mods),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "task_type": "SEQ_CLS" if rec["task"] == "seq-cls" else "CAUSAL_LM",
    }
    if rec.get("head_modules"):
        cfg["modules_to_save"] = list(rec["head_modules"])
    return cfg


def _suffixes(names: list[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names})


def axolotl_dict(rec: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
    q = rec["quantization"]["format"]
    bnb = rec["quantization"]["bnb_config"]
    d: dict[str, Any] = {
        "adapter": "qlora" if q in ("nf4", "nf4-dq", "fp4") else "lora",
        "load_in_8bit": q == "llm.int8",
        "load_in_4bit": q in ("nf4", "nf4-dq", "fp4"),
        "lora_r": lora["r"],
        "lora_alpha": lora["lora_alpha"],
        "lora_dropout": lora["lora_dropout"],
        "lora_target_modules": lora["target_modules"],
    }
    if lora.get("use_rslora"):
        d["peft_use_rslora"] = True
    if lora.get("rank_pattern"):
        d["lora_rank_pattern"] = lora["rank_pattern"]
    if lora.get("alpha_pattern"):
        d["lora_alpha_pattern"] = lora["alpha_pattern"]
    if lora.get("modules_to_save"):
        d["lora_modules_to_save"] = lora["modules_to_save"]
    if d["load_in_4bit"]:
        d["bnb_config_kwargs"] = {
            k: v for k, v in bnb.items() if k.startswith("bnb_4bit") or k == "llm_int8_skip_modules"
        }
    return d


def llamafactory_dict(rec: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
    q = rec["quantization"]["format"]
    d: dict[str, Any] = {
        "finetuning_type": "lora",
        "lora_rank": lora["r"],
        "lora_alpha": lora["lora_alpha"],
        "lora_dropout": lora["lora_dropout"],
        "lora_target": ",".join(_suffixes(lora["target_modules"])),
    }
    if lora.get("use_rslora"):
        d["use_rslora"] = True
    if lora.get("modules_to_save"):
        d["additional_target"] = ",".join(lora["modules_to_save"])
    if q != "none":
        d["quantization_bit"] = 8 if q == "llm.int8" else 4
        d["quantization_method"] = "bnb"
        if d["quantization_bit"] == 4:
            d["quantization_type"] = "fp4" if q == "fp4" else "nf4"
            d["double_quantization"] = q == "nf4-dq"
    return d


def _yaml(path: Path, header: list[str], data: dict[str, Any]) -> None:
    text = "".join(f"# {h}\n" for h in header) + yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, lambda f: f.write(text))


def write_configs(rec: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write the four config files next to ``recommendation.json``; returns {kind: file name}."""
    out = Path(out)
    lora = lora_config_dict(rec)
    write_json(out / "lora_config.json", lora)
    write_json(out / "bnb_config.json", rec["quantization"]["bnb_config"])
    notes = ["written by hessrank recommend; merge into your axolotl config"]
    if lora.get("rank_pattern"):
        notes.append("lora_rank_pattern / lora_alpha_pattern need a recent axolotl (older versions drop them)")
    if rec["quantization"]["format"] == "llm.int8" and rec["quantization"]["skip_modules"]:
        notes.append("axolotl's 8-bit path ignores bnb_config_kwargs: the skip list cannot be applied there")
    _yaml(out / "axolotl.yaml", notes, axolotl_dict(rec, lora))
    lf_notes = ["written by hessrank recommend; merge into your LLaMA-Factory config"]
    if lora.get("rank_pattern"):
        lf_notes.append(
            f"LLaMA-Factory has no per-module rank: global rank {lora['r']} used; per-module ranks "
            "are in lora_config.json"
        )
    included = set(lora["target_modules"])
    all_mods = set(rec["modules"])
    if included != all_mods:
        lf_notes.append("lora_target names module types; modules hessrank left without an adapter are included")
    if rec["quantization"]["skip_modules"]:
        lf_notes.append("LLaMA-Factory cannot keep single modules unquantized; the skip list is not applied")
    _yaml(out / "llamafactory.yaml", lf_notes, llamafactory_dict(rec, lora))
    return {
        "peft": "lora_config.json",
        "bitsandbytes": "bnb_config.json",
        "axolotl": "axolotl.yaml",
        "llamafactory": "llamafactory.yaml",
    }
