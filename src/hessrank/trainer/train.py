"""Training runs: apply a recommendation (or any method) with PEFT + bitsandbytes, train, evaluate, save.

One run = one :class:`TrainConfig` → one folder::

    RUN/train_config.json   the configuration (a rerun with another configuration is refused)
    RUN/checkpoints/        transformers Trainer checkpoints (resume from the last one)
    RUN/adapter/            the trained adapter: ``PeftModel.from_pretrained(base, RUN/adapter)`` loads it
                            (for BitFit / full fine-tuning: ``trainable.safetensors`` with the changed tensors)
    RUN/metrics.json        ``hessrank.metrics/1``, shaped like PEFT's method-comparison results:
                            run_info / train_info / meta_info

For a classifier with a new head, the head is first fitted as a linear probe (``probe_head``, default on: LP-FT,
Kumar et al., ICLR 2022) — the point the analysis measured the Hessian at — so that a rank ladder compares what
the adapters add rather than how fast a random head learns. Training uses transformers' ``Trainer`` (AdamW,
linear schedule with warm-up, gradient accumulation, optional gradient checkpointing, seed), evaluates the
held-out split every ``eval_every`` steps and keeps the best checkpoint by held-out loss (early stopping, as
``../shared/VALIDATION.md`` asks: a rung of a rank ladder must be judged at its best, not at an arbitrary last
step). Final metrics: loss and perplexity always; accuracy for classification (the head's argmax, or for a
causal LM on prompt→label data the argmax over the label verbalizers' first tokens); optionally GSM8K
final-answer exact match by greedy generation.

Methods: ``lora`` (``rank_pattern``/``alpha_pattern`` honoured), ``rslora``, ``dora``, ``lora-eva`` (PEFT's EVA
initialisation), ``adalora``, ``ia3``, ``prefix``, ``prompt``, ``bitfit`` (only biases trainable), ``full``; each
with a base-weight format none | llm.int8 | nf4 | nf4-dq | fp4 (QLoRA = nf4/nf4-dq + lora).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as _dist
from ..advisor.rank import RSLORA_ALPHA
from ..data import IGNORE_INDEX, Dataset, Encoder, check_labels, load_dataset, resolve_num_labels, split_dataset
from ..engine.tasks import batch_to
from ..errors import HessrankError
from ..io import (
    config_from_dict,
    differing_fields,
    ensure_new_or_resumable,
    read_json,
    refuse_other_config,
    stored_config,
    write_config,
    write_json,
)
from ..models import load_model, resolve_targets, resolve_task
from ..results import adalora_init_rank
from ..runtime import _versions, resolve_device

log = logging.getLogger(__name__)

SCHEMA = "hessrank.metrics/1"
#: a run folder's ``train_config.json`` (the configuration a resume must match; metrics.json keeps a copy in
#: ``run_info.train_config``)
CONFIG_SCHEMA = "hessrank.train_config/1"
TIMING_FILE = "hessrank_time.json"  # train seconds and tokens up to a checkpoint (resume keeps the whole cost)
METHODS = ("lora", "rslora", "dora", "lora-eva", "adalora", "ia3", "prefix", "prompt", "bitfit", "full")
#: Default learning rates (AdamW) when ``lr`` is None: adapters and BitFit 1e-3 (the rate the validation cases of
#: reports/validation.md train with), full fine-tuning 2e-5.
DEFAULT_LR: dict[str, float] = {m: 1e-3 for m in METHODS} | {"full": 2e-5}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
QUANT_FOR_LOAD = {"none": "none", "llm.int8": "int8", "int8": "int8", "nf4": "nf4", "nf4-dq": "nf4", "fp4": "fp4"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    model: str
    data: str
    task: str | None = None
    method: str = "lora"
    quantization: str = "none"
    rank: int = 8
    alpha: float | None = None  #: default 2·rank, or :data:`RSLORA_ALPHA` with ``use_rslora``
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str = "q_proj,v_proj"
    #: scale LoRA by α/√r instead of α/r (PEFT ``use_rslora``; method ``rslora`` implies it); the advice's recipe
    use_rslora: bool = False
    dropout: float = 0.0
    num_virtual_tokens: int = 16
    steps: int | None = None  #: None: ``epochs`` passes over the training split (see :func:`resolve_schedule`)
    epochs: float = 3.0
    lr: float | None = None  #: None: the method's default (:data:`DEFAULT_LR`)
    lr_scheduler: str = "linear"  #: transformers scheduler: linear, cosine, constant_with_warmup, ...
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 64
    eval_fraction: float = 0.1
    max_train: int | None = 3000
    max_eval: int | None = 500
    eval_every: int | None = None  #: None: ten evaluations per run
    patience: int | None = 3  #: stop after this many evaluations without improvement (None: never)
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str = "auto"
    num_labels: int | None = None
    gen_eval: int = 0  #: GSM8K-style exact match on this many held-out examples (0: off)
    gen_max_new_tokens: int = 192
    probe_head: bool = True  #: seq-cls: fit the new head as a linear probe before fine-tuning (LP-FT)
    #: share of the held-out split that chooses the checkpoint (evaluation curve, early stopping, best checkpoint);
    #: the reported metrics are measured on the rest only. 0: one held-out set does both (selection-biased)
    selection_fraction: float = 0.0
    data_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HessrankError(f"method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.quantization not in QUANT_FOR_LOAD:
            raise HessrankError(f"quantization '{self.quantization}' is not one of {', '.join(QUANT_FOR_LOAD)}")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_every", "rank"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise HessrankError(f"{name.replace('_', '-')} must be at least 1, got {v}")
        if self.lr is not None and not self.lr > 0:
            raise HessrankError(f"lr must be positive, got {self.lr}")
        if not self.epochs > 0:
            raise HessrankError(f"epochs must be positive, got {self.epochs}")
        if self.lr_scheduler not in SCHEDULERS:
            raise HessrankError(f"lr-scheduler '{self.lr_scheduler}' is not one of {', '.join(SCHEDULERS)}")
        if not 0 <= self.selection_fraction < 1:
            raise HessrankError(f"selection-fraction must be in [0, 1), got {self.selection_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise HessrankError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.method in ("bitfit", "full", "prefix", "prompt") and self.quantization != "none":
            raise HessrankError(f"method '{self.method}' trains base weights or needs none; use quantization none")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def rank_stable(self) -> bool:
        """Whether LoRA is scaled by α/√r (``use_rslora`` or method ``rslora``)."""
        return self.use_rslora or self.method == "rslora"

    def alpha_for(self, rank: int) -> float:
        """lora_alpha of a module of ``rank``: ``alpha`` if given, else :data:`RSLORA_ALPHA` (α/√r scaling) or 2r."""
        if self.alpha is not None:
            return self.alpha
        return RSLORA_ALPHA if self.rank_stable else 2 * rank

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d, "training")

    @classmethod
    def from_recommendation(cls, path: str | Path, data: str | None = None, **overrides: Any) -> TrainConfig:
        """A LoRA run that applies ``recommendation.json``: model, task, format, ranks, targets, data."""
        rec = read_json(path, schema="hessrank.recommendation/1")
        an = rec["analysis"]["config"]
        mods = {m: d for m, d in rec["modules"].items() if d["rank"] > 0}
        r = int(rec["global_rank"])
        lora = rec.get("lora") or {}  # recommendations before rank-stable scaling: α = 2r per module
        rs = bool(lora.get("use_rslora", False))
        alpha = float(lora["lora_alpha"]) if rs else 2 * r
        kw: dict[str, Any] = {
            "model": rec["model"],
            "data": data or an["data"],
            "task": rec["task"],
            "method": "lora",
            "use_rslora": rs,
            "quantization": rec["quantization"]["format"],
            "rank": r,
            "alpha": None if rs else alpha,
            "rank_pattern": {m: int(d["rank"]) for m, d in mods.items() if int(d["rank"]) != r},
            "alpha_pattern": {m: d["alpha"] for m, d in mods.items() if float(d["alpha"]) != alpha},
            "target_modules": sorted(mods),
            "max_length": int(an["max_length"]),
            "seed": int(an["seed"]),
            "num_labels": an.get("num_labels"),
            "data_options": dict(an.get("data_options") or {}),
        }
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(kw)


# ----------------------------------------------------------------------------------------------------------
# building the trainable model
# ----------------------------------------------------------------------------------------------------------


def _task_type(task: str) -> str:
    return "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"


def _escape_pattern(d: dict[str, Any]) -> dict[str, Any]:
    # full module names become exact regex keys (PEFT matches keys with re.match(rf"(.*\\.)?({key})$", name))
    return {(k if any(c in k for c in "*+?[]()|\\") else re.escape(k)): v for k, v in d.items()}


def build_peft_model(
    model: nn.Module,
    cfg: TrainConfig,
    task: str,
    head: list[str],
    train_loader: Any = None,
    total_steps: int | None = None,
) -> nn.Module:
    """Wrap ``model`` for ``cfg.method``; returns the model whose trainable parameters the optimiser sees."""
    from peft import (
        AdaLoraConfig,
        EvaConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        get_peft_model,
        initialize_lora_eva_weights,
        prepare_model_for_kbit_training,
    )

    def targets() -> list[str] | str:
        t = cfg.target_modules
        return t if t == "all-linear" else resolve_targets(model, t)

    tt = _task_type(task)
    m = cfg.method
    if cfg.quantization != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing rename
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if m == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if m == "bitfit":
        n = 0
        for name, p in model.named_parameters():
            train_it = name.endswith(".bias") or any(name.startswith(h + ".") for h in head)
            p.requires_grad_(train_it)
            n += int(name.endswith(".bias"))
        if n == 0:
            raise HessrankError(f"BitFit trains bias terms only, and model '{cfg.model}' has none")
        return model
    alpha = cfg.alpha_for(cfg.rank)
    if m in ("lora", "rslora", "dora", "lora-eva"):
        conf = LoraConfig(
            r=cfg.rank,
            lora_alpha=alpha,
            target_modules=targets(),
            lora_dropout=cfg.dropout,
            task_type=tt,
            rank_pattern=_escape_pattern(cfg.rank_pattern),
            alpha_pattern=_escape_pattern(cfg.alpha_pattern),
            use_rslora=cfg.rank_stable,
            use_dora=(m == "dora"),
            modules_to_save=head or None,
            init_lora_weights="eva" if m == "lora-eva" else True,
            # seq-cls labels are one per row, not a token mask: EVA then uses the attention mask alone
            eva_config=EvaConfig(rho=2.0, use_label_mask=task != "seq-cls") if m == "lora-eva" else None,
        )
        pm = get_peft_model(model, conf)
        if m == "lora-eva":
            if train_loader is None:
                raise HessrankError("lora-eva needs training batches for its initialisation")
            initialize_lora_eva_weights(pm, train_loader, prepare_layer_inputs_fn=_eva_layer_inputs)
        return pm
    if m == "adalora":
        steps = total_steps or cfg.steps or 200
        conf = AdaLoraConfig(
            init_r=adalora_init_rank(cfg.rank),
            target_r=cfg.rank,
            lora_alpha=alpha,
            target_modules=targets(),
            lora_dropout=cfg.dropout,
            task_type=tt,
            total_step=steps,
            tinit=max(1, steps // 10),
            tfinal=max(1, steps // 5),
            deltaT=max(1, steps // 20),
            modules_to_save=head or None,
        )
        return get_peft_model(model, conf)
    if m == "ia3":
        conf = IA3Config(target_modules=targets(), feedforward_modules=[], task_type=tt, modules_to_save=head or None)
        return get_peft_model(model, conf)
    if m == "prefix":
        return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=tt))
    if m == "prompt":
        return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=tt))
    raise HessrankError(f"method '{m}' is not supported")


def count_params(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        qs = getattr(p, "quant_state", None)
        n = int(qs.shape.numel()) if qs is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def label_token_ids(tokenizer: Any, ds: Dataset) -> list[int] | None:
    """First token of each verbalized label (``answer_prefix + name``), for label-token accuracy."""
    if not ds.label_names:
        return None
    ids = [tokenizer(ds.answer_prefix + n, add_special_tokens=False)["input_ids"][0] for n in ds.label_names]
    if len(set(ids)) < len(ids):
        log.warning("label names share their first token; label-token accuracy is ambiguous")
    return ids


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    task: str,
    label_ids: list[int] | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Held-out loss (mean over items/tokens), perplexity (causal LM), accuracy (classification)."""
    model.eval()
    tot_loss = 0.0
    n_items = 0
    correct = 0
    n_cls = 0
    for b in batches:
        b = batch_to(b, device)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = out.logits.float()
        if task == "seq-cls":
            loss = nn.functional.cross_entropy(logits, b["labels"], reduction="sum")
            tot_loss += float(loss)
            n_items += int(b["labels"].shape[0])
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            n_cls += int(b["labels"].shape[0])
        else:
            if logits.shape[1] != b["labels"].shape[1]:  # prompt/prefix tuning prepends virtual tokens
                logits = logits[:, -b["labels"].shape[1] :]
            tgt = b["labels"][:, 1:]
            lg = logits[:, :-1]
            keep = tgt != IGNORE_INDEX
            tot_loss += float(nn.functional.cross_entropy(lg[keep], tgt[keep], reduction="sum"))
            n_items += int(keep.sum())
            if label_ids is not None:
                has = keep.any(dim=1)  # rows whose answer survived truncation
                first = keep.float().argmax(dim=1)  # first answer position per row
                rows = torch.arange(lg.shape[0], device=lg.device)[has]
                scores = lg[rows, first[has]][:, label_ids]
                truth = tgt[rows, first[has]]
                lab = torch.tensor(label_ids, device=lg.device)
                correct += int((lab[scores.argmax(-1)] == truth).sum())
                n_cls += int(has.sum())
    res = {"eval_loss": tot_loss / max(n_items, 1), "eval_items": n_items}
    if task == "causal-lm":
        res["perplexity"] = math.exp(min(res["eval_loss"], 50.0))
    if n_cls:
        res["accuracy"] = correct / n_cls
    return res


_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: after '####', else the last number in the text."""
    m = _ANSWER.search(text)
    raw = m.group(1) if m else (_NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    raw = raw.replace(",", "").rstrip(".")
    try:
        v = float(raw)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else str(v)


@torch.no_grad()
def generative_exact_match(
    model: nn.Module, tokenizer: Any, encoder: Encoder, ds: Dataset, n: int, max_new_tokens: int, device: torch.device
) -> dict[str, float]:
    """Greedy generation on ``n`` examples; exact match of the final numeric answer (GSM8K)."""
    model.eval()
    hits = 0
    for ex in ds.examples[:n]:
        prompt = encoder.prompt_of(ex)
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += int(gsm8k_answer(text) is not None and gsm8k_answer(text) == gsm8k_answer(ex.answer or ""))
    return {"exact_match": hits / max(n, 1), "exact_match_n": n}


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    On Linux from ``VmHWM`` in ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` survives ``exec`` and so
    reports the *parent's* RSS at fork time when that was larger (a subprocess started from a big test process).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_peak_rss"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass(frozen=True)
class Schedule:
    """The resolved step count, learning rate and evaluation cadence of a run."""

    steps: int
    lr: float
    eval_every: int
    warmup_steps: int


def resolve_schedule(cfg: TrainConfig, n_train: int) -> Schedule:
    """Fill the config's automatic values: ``steps`` = ⌈epochs · n_train / (batch · grad_accum)⌉ (at least 20),
    ``lr`` from :data:`DEFAULT_LR`, ``eval_every`` = steps / 10 (evaluations are the early-stopping points)."""
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.steps if cfg.steps is not None else max(20, math.ceil(cfg.epochs * n_train / per_step))
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    every = cfg.eval_every if cfg.eval_every is not None else max(1, steps // 10)
    return Schedule(steps, lr, min(every, steps), round(cfg.warmup_ratio * steps))


#: the share of a run's steps at its end over which :func:`plateau_status` looks for improvement
PLATEAU_WINDOW = 0.25


def plateau_status(eval_curve: list[dict[str, Any]], steps: int, best_step: int | None, rel: float = 0.01) -> bool:
    """True when the run reached a plateau of its held-out loss: the best checkpoint came before the last
    evaluation (early stopping found a minimum), or the held-out loss improved by at most ``rel`` (relative) over
    the last :data:`PLATEAU_WINDOW` of the run — the last evaluation against the best one at or before step
    (1 − window)·steps. A run that is False was still improving when it stopped: it measured how fast it learns.

    Over the last quarter, not between the last two evaluations: under a decaying schedule (linear, cosine) the
    learning rate is near zero at the end, so the last two evaluations of a run that is still improving barely
    differ (AG News, advice seed 2 under linear decay, session 14: −0.5% over its last evaluation, −2.4% over its
    last four). With one evaluation only, nothing says it settled (False)."""
    if best_step is not None and best_step < steps:
        return True
    if len(eval_curve) < 2:
        return False
    cut = (1 - PLATEAU_WINDOW) * steps
    before = [e["eval_loss"] for e in eval_curve[:-1] if e["step"] <= cut] or [eval_curve[-2]["eval_loss"]]
    ref, last = min(before), eval_curve[-1]["eval_loss"]
    return ref - last <= rel * max(abs(ref), 1e-12)


def _per_process(batch_size: int) -> int:
    """Under torchrun the configured batch is the global one, split over the processes, so the recipe (steps,
    examples per step, learning rate) is that of one process."""
    world = _dist.env_world_size()
    if batch_size % world:
        raise HessrankError(f"batch size {batch_size} does not split over {world} processes; use a multiple of {world}")
    return batch_size // world


def _training_args(cls: Any, cfg: TrainConfig, sch: Schedule, ckpt: Path, device: torch.device, progress: bool) -> Any:
    return cls(
        output_dir=str(ckpt),
        max_steps=sch.steps,
        learning_rate=sch.lr,
        warmup_steps=sch.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=_per_process(cfg.batch_size),
        per_device_eval_batch_size=_per_process(cfg.batch_size),
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        eval_strategy="steps",
        eval_steps=sch.eval_every,
        save_strategy="steps",
        save_steps=sch.eval_every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, min(10, sch.eval_every)),
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        save_only_model=False,
        optim="adamw_torch",
    )


#: A finished run may be extended (more ``steps``, resumed from its last checkpoint) only where the continuation
#: is exact: a schedule that is constant after warm-up.
EXTENDABLE_SCHEDULERS = ("constant", "constant_with_warmup")


def _prepare_run(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the folder; returns the finished metrics when there is nothing to do.

    A folder holding the same configuration resumes (or is finished). One that differs only in ``steps`` is the
    same run trained for another length: fewer steps asked than it holds → its finished result; more steps on a
    constant schedule → an extension, resumed from its last checkpoint. Anything else is refused.
    """
    cfg_file = out / "train_config.json"
    held = None if overwrite else stored_config(cfg_file, _normalise, "training", strict=True)
    if held is not None:
        new = cfg.to_dict()
        diff = differing_fields(held[1], new)
        old = held[1]
        length_only = diff == ["steps"] and old.get("steps") is not None and cfg.steps is not None
        if diff and not length_only:
            refuse_other_config(out, "a run", diff)
        done = (out / "metrics.json").exists()
        if length_only and cfg.steps < old["steps"] and done:
            return read_json(out / "metrics.json", schema=SCHEMA)  # the run was extended beyond this length
        if length_only and cfg.steps > old["steps"]:
            if cfg.method == "adalora":
                raise HessrankError(
                    f"{out}: an AdaLoRA run cannot be extended: its rank budget schedule is tied to its total steps"
                )
            if cfg.lr_scheduler not in EXTENDABLE_SCHEDULERS:
                raise HessrankError(
                    f"{out}: extending a run from {old['steps']} to {cfg.steps} steps needs a schedule that is "
                    f"constant after warm-up ({', '.join(EXTENDABLE_SCHEDULERS)}), not '{cfg.lr_scheduler}'"
                )
            log.info("extending %s from %d to %d steps", out, old["steps"], cfg.steps)
            (out / "metrics.json").unlink(missing_ok=True)
        elif done and resume:
            return read_json(out / "metrics.json", schema=SCHEMA)
    ensure_new_or_resumable(out, "train_config.json", resume=resume, overwrite=overwrite)
    if overwrite:
        for p in ("checkpoints", "adapter", "metrics.json"):
            target = out / p
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    write_config(cfg_file, CONFIG_SCHEMA, cfg.to_dict())
    return None


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    return TrainConfig.from_dict(config).to_dict()


def _eva_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The rows EVA's incremental SVD sees for one layer: PEFT's token selection, except for per-sequence inputs.

    PEFT's ``prepare_layer_inputs_fn_language_modeling`` indexes a layer's input with the (sequence, token)
    positions of the attention mask, which assumes an input of shape [batch, tokens, features]. A layer that sees
    one vector per sequence (BERT's pooler reads the first token: [batch, features]) would be indexed as if its
    features were tokens, and PEFT fails inside ``IncrementalPCA``; its rows are used as they are.
    """
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        return x.contiguous()  # a slice such as hidden[:, 0]; PEFT hashes inputs with .view(-1)
    return prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name)


@dataclass
class _Run:
    """The model and data of one run, ready for the Trainer."""

    cfg: TrainConfig
    task: str
    device: torch.device
    ds: Dataset
    train_ds: Dataset
    eval_ds: Dataset
    lm: Any
    enc: Encoder
    train_items: list[dict[str, Any]]
    eval_items: list[dict[str, Any]]
    model: nn.Module
    probe_info: dict[str, Any] | None
    schedule: Schedule
    select_items: list[dict[str, Any]] | None = None  #: chooses the checkpoint when apart from ``eval_items``


def _build(cfg: TrainConfig) -> _Run:
    """Data, split, model (in its weight format), head probe (seq-cls), adapters."""
    device = resolve_device(cfg.device)
    if _dist.env_world_size() > 1:
        device = _dist.rank_device(device, _dist.from_env(device))
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data, **cfg.data_options)
    task = resolve_task(cfg.model, cfg.task)
    train_ds, eval_ds = split_dataset(
        ds, cfg.eval_fraction, seed=cfg.seed, max_train=cfg.max_train, max_eval=cfg.max_eval
    )
    num_labels = resolve_num_labels(ds, task, cfg.num_labels)
    if task == "seq-cls":
        check_labels(ds, num_labels)
    lm = load_model(
        cfg.model,
        task,
        num_labels=num_labels,
        quantization=QUANT_FOR_LOAD[cfg.quantization],
        double_quant=(cfg.quantization == "nf4-dq"),
        seed=cfg.seed,
        device=device,
    )
    enc = Encoder(lm.tokenizer, task, cfg.max_length, dataset=train_ds)
    train_items = [enc.encode(e) for e in train_ds.examples]
    eval_items = [enc.encode(e) for e in eval_ds.examples]
    select_items = None
    if cfg.selection_fraction:
        n_sel = round(cfg.selection_fraction * len(eval_items))
        if not 0 < n_sel < len(eval_items):
            raise HessrankError(
                f"selection-fraction {cfg.selection_fraction} of {len(eval_items)} held-out examples leaves one "
                "part empty; raise --max-eval or change the fraction"
            )
        # the held-out split is already shuffled by the seed: its first part selects, the rest reports
        select_items, eval_items = eval_items[:n_sel], eval_items[n_sel:]
        eval_ds = dataclasses.replace(eval_ds, examples=eval_ds.examples[n_sel:])
    head: list[str] = []
    probe_info = None
    if task == "seq-cls":
        from ..engine.probe import find_head, fit_head

        head = [find_head(lm.model)[0]]
        if cfg.probe_head:
            # LP-FT: start from a fitted head, the same point the analysis measured the Hessian at
            n = min(512, len(train_items))
            pb = [enc.collate(train_items[i : i + 32]) for i in range(0, n, 32)]
            probe_info = dataclasses.asdict(fit_head(lm.model, pb))
    loader = None
    if cfg.method == "lora-eva":
        loader = torch.utils.data.DataLoader(
            _ListDataset(train_items[: cfg.batch_size * 8]), batch_size=cfg.batch_size, collate_fn=enc.collate
        )
    sch = resolve_schedule(cfg, len(train_items))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' gradient-checkpointing renames, via PEFT
        model = build_peft_model(lm.model, cfg, task, head, loader, total_steps=sch.steps)
    return _Run(
        cfg, task, device, ds, train_ds, eval_ds, lm, enc, train_items, eval_items, model, probe_info, sch, select_items
    )


def _callbacks(run: _Run, ckpt: Path, prior: dict[str, Any], totals_complete: bool, tokens: list[int]) -> list[Any]:
    """Early stopping, AdaLoRA's rank updates, and the timing record written beside every checkpoint."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    cfg, model = run.cfg, run.model
    callbacks: list[Any] = []
    if cfg.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    if cfg.method == "adalora":

        class _AdaLoraStep(TrainerCallback):
            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                model.base_model.update_and_allocate(state.global_step)

        callbacks.append(_AdaLoraStep())
    clock = {"t0": time.time()}

    class _Timing(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["t0"] = time.time()

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            d = ckpt / f"checkpoint-{state.global_step}"
            if d.is_dir() and totals_complete and state.is_world_process_zero:
                write_json(
                    d / TIMING_FILE,
                    {
                        "train_time": float(prior.get("train_time", 0.0)) + time.time() - clock["t0"],
                        "train_tokens": int(prior.get("train_tokens", 0)) + tokens[0],
                    },
                )

    callbacks.append(_Timing())
    return callbacks


def _fit(run: _Run, out: Path, resume: bool, progress: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Train with transformers' Trainer, resuming from the last checkpoint; returns (trainer, result, timing)."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    ckpt = out / "checkpoints"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames gradient_checkpointing in v6
        args = _training_args(TrainingArguments, run.cfg, run.schedule, ckpt, run.device, progress)
    last = None
    if resume and ckpt.is_dir() and run.cfg.method == "adalora":
        # PEFT cannot load an AdaLoRA checkpoint whose ranks were already pruned: an interrupted run starts again
        log.info("%s: AdaLoRA runs restart instead of resuming (pruned ranks cannot be reloaded)", out)
        shutil.rmtree(ckpt)
    elif resume and ckpt.is_dir():
        # a checkpoint is complete once transformers has written trainer_state.json, its last file: a run killed
        # while saving leaves a partial folder, which is skipped (the one before it is resumed)
        cks = sorted(
            (c for c in ckpt.glob("checkpoint-*") if (c / "trainer_state.json").is_file()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        last = str(cks[-1]) if cks else None
    # training time and tokens before an interruption live beside the checkpoint they led to, so a resumed run
    # reports its whole cost (HF's TrainerState keeps no wall time); a checkpoint without that file (killed
    # between HF's save and ours, or older than it) leaves the totals marked incomplete
    timing_file = Path(last) / TIMING_FILE if last else None
    prior = read_json(timing_file) if timing_file is not None and timing_file.exists() else {}
    totals_complete = last is None or bool(prior)
    tokens = [0]

    def count_tokens(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # counted where the model trains on them: a collate function would also see evaluation batches and the
        # batch accelerate's loader prefetches, and a resumed run would count the prefetched batch twice
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            tokens[0] += int(mask.sum())

    callbacks = _callbacks(run, ckpt, prior, totals_complete, tokens)
    verbosity = hf_logging.get_verbosity()
    token_hook = run.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    t0 = time.time()
    try:
        hf_logging.set_verbosity_error()
        trainer = Trainer(
            model=run.model,
            args=args,
            train_dataset=_ListDataset(run.train_items),
            eval_dataset=_ListDataset(run.select_items if run.select_items is not None else run.eval_items),
            data_collator=run.enc.collate,
            callbacks=callbacks,
        )
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            result = trainer.train(resume_from_checkpoint=last)
    finally:
        hf_logging.set_verbosity(verbosity)
        token_hook.remove()
    session = time.time() - t0
    timing = {
        "train_time": float(prior.get("train_time", 0.0)) + session,
        "train_tokens": int(prior.get("train_tokens", 0)) + tokens[0],
        "tokens_per_sec": tokens[0] / max(session, 1e-9),
        "resumed_from_step": int(last.rsplit("-", 1)[1]) if last else None,
        "totals_complete": totals_complete,
    }
    return trainer, result, timing


def _save_adapter(run: _Run, out: Path) -> Path:
    adapter = out / "adapter"
    adapter.mkdir(exist_ok=True)
    if hasattr(run.model, "save_pretrained") and run.cfg.method not in ("full", "bitfit"):
        run.model.save_pretrained(str(adapter))
    else:
        from safetensors.torch import save_file

        state = {n: p.detach().cpu().contiguous() for n, p in run.model.named_parameters() if p.requires_grad}
        save_file(state, str(adapter / "trainable.safetensors"))
    return adapter


def train(
    cfg: TrainConfig, out: str | Path, resume: bool = True, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume, extend, or return the finished result of) one training run into folder ``out``."""
    out = Path(out)
    # under torchrun (transformers' Trainer runs DDP): rank 0 prepares the folder and writes every file
    return _dist.run_stage(
        out,
        "train",
        resolve_device(cfg.device),
        progress,
        lambda prog, ctx: _train(cfg, out, resume, overwrite, prog, ctx),
    )


def _train(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    ctx: _dist.DistContext | None = None,
) -> dict[str, Any]:
    done = _prepare_run(cfg, out, resume, overwrite) if ctx is None or ctx.is_main else None
    if ctx is not None:
        done = ctx.broadcast_object(done)  # the folder is ready (or finished) once rank 0 says so
    if done is not None:
        return done
    started = time.time()
    run = _build(cfg)
    trainable, total = count_params(run.model)
    if trainable == 0:
        raise HessrankError(f"method '{cfg.method}' left no trainable parameters")
    trainer, result, timing = _fit(run, out, resume, progress)
    if ctx is not None and not ctx.is_main:
        return ctx.broadcast_object(None)  # rank 0 evaluates, saves the adapter and writes metrics.json
    history = trainer.state.log_history
    loss_curve = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    eval_curve = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    best_step = None
    if trainer.state.best_model_checkpoint:
        best_step = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
    steps_done = int(trainer.state.global_step)
    plateaued = plateau_status(eval_curve, steps_done, best_step)
    if not plateaued:
        log.warning(
            "%s: STILL IMPROVING at its last evaluation (step %d, held-out loss %s): the run has not reached a "
            "plateau; train longer (--steps or --epochs) before trusting this result",
            out,
            steps_done,
            f"{eval_curve[-1]['eval_loss']:.4f}" if eval_curve else "?",
        )
    t1 = time.time()
    eval_batches = [
        run.enc.collate(run.eval_items[i : i + cfg.batch_size]) for i in range(0, len(run.eval_items), cfg.batch_size)
    ]
    label_ids = label_token_ids(run.lm.tokenizer, run.train_ds) if run.task == "causal-lm" else None
    metrics = evaluate(run.model, eval_batches, run.task, label_ids, run.device)
    if cfg.gen_eval and run.task == "causal-lm":
        metrics.update(
            generative_exact_match(
                run.model, run.lm.tokenizer, run.enc, run.eval_ds, cfg.gen_eval, cfg.gen_max_new_tokens, run.device
            )
        )
    eval_time = time.time() - t1
    adapter = _save_adapter(run, out)
    peak, kind = _peak_memory(run.device)
    doc = {
        "schema": SCHEMA,
        "run_info": {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_time": time.time() - started,
            "experiment_name": out.name,
            "train_config": cfg.to_dict(),
            "schedule": dataclasses.asdict(run.schedule),
            "peft_config": _peft_config_dict(run.model),
            "head_probe": run.probe_info,
        },
        "train_info": {
            "status": "success",
            "num_trainable_params": trainable,
            "num_total_params": total,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            **timing,
            "eval_time": eval_time,
            "steps": steps_done,
            "best_step": best_step,
            "plateaued": plateaued,
            "train_loss": float(result.training_loss),
            "loss_curve": loss_curve,
            "eval_curve": eval_curve,
            "metrics": metrics,
            "adapter_size_bytes": _dir_size(adapter),
            **({"selection_items": len(run.select_items)} if run.select_items is not None else {}),
        },
        "meta_info": {
            "model": {"name": cfg.model, "task": run.task, "path": str(run.lm.path)},
            "dataset": {
                "source": run.ds.source,
                "train_examples": len(run.train_ds),
                "eval_examples": len(run.eval_ds),
                "label_names": run.ds.label_names,
            },
            "package_info": _versions(),
            "system_info": {
                "device": str(run.device),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "world_size": _dist.env_world_size(),  # torchrun processes (DDP); 1 for a plain run
            },
        },
    }
    write_json(out / "metrics.json", doc)
    return doc if ctx is None else ctx.broadcast_object(doc)


def _peft_config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    c = next(iter(cfg.values()))
    d = c.to_dict() if hasattr(c, "to_dict") else {}
    return json.loads(json.dumps(d, default=str))


def load_trained(run: str | Path) -> tuple[nn.Module, Any, TrainConfig]:
    """The base model with a run's trained adapter (or trained tensors) loaded, ready to evaluate."""
    from peft import PeftModel

    run = Path(run)
    cfg = TrainConfig.from_dict(read_json(run / "train_config.json")["config"])
    ds = load_dataset(cfg.data, **cfg.data_options)
    task = resolve_task(cfg.model, cfg.task)
    num_labels = resolve_num_labels(ds, task, cfg.num_labels)
    lm = load_model(
        cfg.model,
        task,
        num_labels=num_labels,
        quantization=QUANT_FOR_LOAD[cfg.quantization],
        double_quant=(cfg.quantization == "nf4-dq"),
        seed=cfg.seed,
    )
    if (run / "adapter" / "trainable.safetensors").exists():
        from safetensors.torch import load_file

        lm.model.load_state_dict(load_file(str(run / "adapter" / "trainable.safetensors")), strict=False)
        return lm.model, lm.tokenizer, cfg
    return PeftModel.from_pretrained(lm.model, str(run / "adapter")), lm.tokenizer, cfg
