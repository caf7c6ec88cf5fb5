"""Validation: run the advice, its rank ladder and the baselines users would pick, and give a paired verdict.

Runs (each a :func:`hessrank.trainer.train.train` folder under ``VAL/runs/``, so a killed validation resumes):

* ``advice-s<seed>`` — the recommendation as given (per-module ranks, advised format), for each seed (default 3);
* ``rank-<r>`` — the uniform rank ladder {r/4, r/2, r, 2r, 4r} around the advised global rank r (advised format,
  same target modules);
* ``rival-s<seed>`` — the closest rival (:func:`closest_rival`: the rung with the lowest selection-half loss at the
  first seed) again with the other seeds, under the same protocol (planned steps, extensions, rates);
* competitors (``--competitors``, default all): ``folk-8`` / ``folk-16`` (the folk rule: uniform r = 8 and 16 on
  the advised modules), ``eva`` (PEFT's EVA initialisation and rank redistribution, ``lora-eva``, at the advice's
  budget), ``adalora`` (AdaLoRA with the advice's final budget), ``uniform-budget`` (one uniform rank at the advice's
  parameter count) and ``uniform-all`` (when the advice leaves analysed modules out: one uniform rank on *every*
  analysed module at the advice's budget); "the advice's budget" is the smallest uniform rank with at least the
  advice's LoRA parameters (:func:`_uniform_rank_for_params`), so no budget competitor trains fewer;
* ``format-<f>`` — the advised ranks in other weight formats; ``method-<m>`` — other methods.

A planned run that trains exactly what an earlier one trains (same training key) reuses it.

**Recipe.** Every run is trained with early stopping on the held-out loss and judged at its best checkpoint
(``../shared/VALIDATION.md``: a short ladder measures optimisation speed, not capacity), on the schedule ``train``
uses by default and transformers' ``Trainer`` too: linear decay after warm-up (``lr_scheduler``), so the verdict is
about the recipe a user trains the advice with. A run still improving at its last evaluation is *extended* up to
``max_extensions`` times: retrained from the start with doubled steps in ``runs/<name>@<steps>`` (under a decaying
schedule the learning rate at every step depends on the total step count, so a longer run is a new training); the
run is then judged by whichever of its trainings has the lower loss on the selection half of the held-out split at
its best checkpoint (``_Runner._judge``), so an extension never replaces a run by one that did worse.
**Learning rate.** Every run (advice, rungs, competitors, the rival's seeds) is trained at each rate of the grid
``lr_grid`` × the recipe's rate (default {1, 2}: ``runs/<name>`` and ``runs/<name>~lr2x``), each extended on its
own, and is judged by the training — over every rate and every extension — whose best checkpoint has the lowest
selection-half loss (``_Runner._merge_rates``): the comparison is then between configurations each at its better
rate, not between how well one rate suits each of them. Why: with one rate for every run (rank-stable scaling
α/√r), doubling it moved SmolLM2/GSM8K's 248,832-parameter advice five times as far as the 1,843,200-parameter
rank 32 (0.8523 → 0.8363 against 0.8295 → 0.8262 at seed 0, reports/validation.md): the verdict measured how
well one rate suits each adapter as much as rank. The grid doubles the training cost of a validation.
``--lr-scheduler constant_with_warmup`` (or ``constant``) keeps the rate constant after warm-up; an extension then
resumes the run from its last checkpoint with doubled steps in its own folder, which is exact and cheaper, but
under a constant rate a run's best checkpoint moves more from one evaluation to the next (MiniLM / AG News: a single
run's reported loss by up to 0.04, reports/validation.md).

**Paired verdict.** Seed-to-seed variation (data order, initialisation) is largely shared by runs with the same
seed, so the advice is compared with its rival *seed by seed*: dₛ = L(rival, s) − L(advice, s), mean d̄ and
standard error se = sd(d)/√n over n ≥ 3 seeds. The band is max(tolerance·L_best, 2·se). The advice is *too small*
when d̄ < −band (the rival is better by more than the band) and the rival trains more parameters, *beaten* when
the better rival trains fewer; otherwise *right* when it trains at most twice the knee's parameters, else *too
large*. The rival is the rung with the lowest selection-half loss at the first seed (:func:`closest_rival`); the
knee r* is the smallest ladder rank whose reported loss at the first seed is within the band of the reported loss
of the run — a rung or the advice — with the lowest selection-half loss (:func:`knee_reference`). A
run that is still improving after the extensions makes the verdict *inconclusive* (the would-be verdict is kept as
provisional). Competitors are single-seed and compared with the advice at the same seed under the same band; the
table says who wins at which budget. Loss decides; accuracy is reported beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HessrankError
from ..io import (
    atomic_write,
    config_from_dict,
    differing_fields,
    ensure_new_or_resumable,
    folder_lock,
    read_json,
    refuse_other_config,
    stored_config,
    write_config,
    write_json,
)
from ..results import Recommendation, competitor_notes, minus_advice_text
from .rates import check_grid
from .rates import selection_loss as _selection_loss
from .rates import with_rate as _with_rate
from .train import EXTENDABLE_SCHEDULERS, RSLORA_ALPHA, TrainConfig, plateau_status, train

log = logging.getLogger(__name__)

SCHEMA = "hessrank.validation/1"
COMPETITORS = ("folk", "eva", "adalora", "uniform-budget", "uniform-all")
FOLK_RANKS = (8, 16)


@dataclass(frozen=True)
class ValidateConfig:
    recommendation: str
    data: str | None = None
    steps: int | None = None  #: None: ``epochs`` passes over the training split
    epochs: float = 3.0
    lr: float | None = None  #: None: the method's default (hessrank.trainer.train.DEFAULT_LR)
    batch_size: int = 16
    eval_every: int | None = None  #: None: ten evaluations per run
    patience: int | None = 3
    max_train: int | None = 3000
    max_eval: int | None = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    formats: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    competitors: tuple[str, ...] = COMPETITORS
    max_extensions: int = 2
    tolerance: float = 0.02
    #: > 0: every run picks its best checkpoint on the first fraction of the held-out split and reports the loss on
    #: the rest (TrainConfig.selection_fraction), so the verdict is not biased by selecting on the reporting set.
    #: 0.5 by default: on MiniLM/AG News the best-of-N checkpoint chosen on the reporting examples hid two thirds of
    #: the gap between the advice and rank 32 (-0.0095 vs -0.0318 paired; reports/validation.md)
    selection_fraction: float = 0.5
    #: the recipe's learning-rate schedule (transformers' name); linear, as ``train`` and transformers' Trainer
    #: default to. Under a decaying schedule an extension retrains from the start with doubled steps; under a
    #: constant one (constant_with_warmup, constant) it resumes from the last checkpoint (see the module docstring)
    lr_scheduler: str = "linear"
    #: multiples of ``lr`` every run is trained at (each run keeps the one whose best checkpoint has the lowest
    #: selection-half loss; see the module docstring). Must hold 1 (the recipe's own rate, ``runs/<name>``)
    lr_grid: tuple[float, ...] = (1.0, 2.0)
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  #: further TrainConfig overrides for every run

    def __post_init__(self) -> None:
        if not self.seeds:
            raise HessrankError("validate needs at least one seed")
        if not 0 < self.tolerance < 1:
            raise HessrankError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if any(m <= 0 for m in self.multipliers):
            raise HessrankError("ladder multipliers must be positive")
        bad = [c for c in self.competitors if c not in COMPETITORS]
        if bad:
            raise HessrankError(f"competitor '{bad[0]}' is not one of {', '.join(COMPETITORS)}")
        if self.max_extensions < 0:
            raise HessrankError(f"max-extensions must be >= 0, got {self.max_extensions}")
        if not 0 <= self.selection_fraction < 1:
            raise HessrankError(f"selection-fraction must be in [0, 1), got {self.selection_fraction}")
        check_grid(self.lr_grid)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise HessrankError(f"lr-scheduler '{self.lr_scheduler}' is not one of {', '.join(LR_SCHEDULERS)}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidateConfig:
        return config_from_dict(cls, d, "validation")


def _rank_label(tc: dict[str, Any]) -> str:
    """The rank a run trained with and on how many modules: ``"4 (12 modules)"``, ``"1-2 (6 modules)"`` for a
    per-module pattern; the plain rank for methods without per-module ranks or without a module list."""
    targets = tc.get("target_modules")
    pattern = tc.get("rank_pattern") or {}
    if tc.get("method") not in ("lora", "rslora", "dora", "lora-eva") or not isinstance(targets, list) or not targets:
        return str(tc.get("rank"))
    ranks = sorted({int(pattern.get(t, tc["rank"])) for t in targets})
    span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return f"{span} ({len(targets)} modules)"


#: schedules a validation accepts (transformers' names); an extension resumes exactly only under the constant ones
#: (:data:`hessrank.trainer.train.EXTENDABLE_SCHEDULERS`), and retrains from the start under the decaying ones
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup", "constant")


def resumable(lr_scheduler: str) -> bool:
    """Whether a run on this schedule, resumed with doubled steps, continues as if it had been given them."""
    return lr_scheduler in EXTENDABLE_SCHEDULERS


def _extension_text(lr_scheduler: str, max_extensions: int) -> str:
    """How the recipe extends a run still improving, in words (validation.json's recipe and the table)."""
    how = "" if resumable(lr_scheduler) else ", retrained from the start"
    return f"steps doubled for a run still improving{how}, at most {max_extensions} times"


EXTENDING_FIELDS = frozenset(
    {"seeds", "multipliers", "formats", "methods", "competitors", "tolerance", "max_extensions", "lr_grid"}
)

#: the learning-rate grid of a validation folder written before ``lr_grid`` was a field (one rate for every run)
LR_GRID_BEFORE_THE_FIELD = (1.0,)


def _rate_name(name: str, multiple: float) -> str:
    """The run name of ``name`` trained at ``multiple`` × the recipe's learning rate: ``rank-8~lr2x``."""
    return name if multiple == 1.0 else f"{name}~lr{multiple:g}x"


def _training_key(tc: TrainConfig) -> str:
    """What a run trains, independent of how LoRA ranks are spelled (global rank vs ``rank_pattern``) and of its
    length (an extended run is the same run)."""
    d = tc.to_dict()
    d.pop("steps", None)
    targets = d.get("target_modules")
    if d.get("method") != "lora" or not isinstance(targets, list):
        return json.dumps(d, sort_keys=True, default=str)
    pat, apat = d.get("rank_pattern") or {}, d.get("alpha_pattern") or {}
    ranks = {t: int(pat.get(t, d["rank"])) for t in targets}
    per = {t: (ranks[t], float(apat.get(t, tc.alpha_for(ranks[t])))) for t in targets}
    rest = {k: v for k, v in d.items() if k not in ("rank", "alpha", "rank_pattern", "alpha_pattern")}
    return json.dumps([per, rest], sort_keys=True, default=str)


def _alpha(plain: TrainConfig, rank: int) -> float | None:
    """lora_alpha of a uniform-rank run derived from the advice's config: the same scaling rule as the advice
    (None: :data:`hessrank.trainer.train.RSLORA_ALPHA` under rank-stable scaling; 2r otherwise)."""
    return None if plain.rank_stable else 2 * rank


def _alpha_rule(metrics: dict[str, Any] | None) -> str:
    """The LoRA scaling rule of the advice's runs, as written in the recipe."""
    tc = (metrics or {}).get("run_info", {}).get("train_config", {})
    if tc.get("use_rslora") or tc.get("method") == "rslora":
        return f"{tc.get('alpha') or RSLORA_ALPHA:g}, scaled by α/√r (rank-stable, use_rslora)"
    return "2r"


def _uniform_rank_for_params(params: int, shapes: list[tuple[int, int]]) -> int:
    """The smallest uniform rank r whose LoRA parameters r·Σ(m+n) over modules of ``shapes`` (m×n) reach ``params``.

    A budget competitor (EVA, AdaLoRA, uniform-budget, uniform-all) thus never trains fewer parameters than the
    advice: a tie or a win of the advice is then one "at equal or fewer trainable parameters" (issue 11's criterion),
    and rounding gives the competitor, not the advice, the benefit of the doubt."""
    per_rank = max(sum(o + i for o, i in shapes), 1)
    return max(1, -(-params // per_rank))


def _resolved_steps(cfg: ValidateConfig, base: TrainConfig) -> int:
    """The step count every run starts with: ``steps``, or ``epochs`` passes over the training split."""
    if cfg.steps is not None:
        return cfg.steps
    from ..data import load_dataset, split_dataset

    ds = load_dataset(base.data, **base.data_options)
    tr, _ = split_dataset(ds, base.eval_fraction, seed=base.seed, max_train=cfg.max_train, max_eval=cfg.max_eval)
    return max(20, math.ceil(cfg.epochs * len(tr) / (cfg.batch_size * base.grad_accum)))


def _competitor_runs(
    cfg: ValidateConfig, plain: TrainConfig, rec: Recommendation, advice_params: int, ru: int, ladder: list[int]
) -> tuple[dict[str, TrainConfig], int | None, dict[str, str]]:
    """The baselines users would pick, at stated budgets (see the module docstring), and why a requested one is not
    trained on its own (it would train what a ladder rung trains, or the advice leaves no analysed module out)."""
    runs: dict[str, TrainConfig] = {}
    skipped: dict[str, str] = {}
    mods = rec.adapted
    if "folk" in cfg.competitors:
        for r in FOLK_RANKS:
            runs[f"folk-{r}"] = dataclasses.replace(plain, rank=r, alpha=_alpha(plain, r))
    if "eva" in cfg.competitors:
        runs["eva"] = dataclasses.replace(plain, method="lora-eva", rank=ru, alpha=_alpha(plain, ru))
    if "adalora" in cfg.competitors:
        # AdaLoRA scales by α/r in its own layers (no rank-stable option): its published recipe, α = 2r
        runs["adalora"] = dataclasses.replace(plain, method="adalora", rank=ru, alpha=2 * ru, use_rslora=False)
    if "uniform-budget" in cfg.competitors:
        if ru not in ladder:
            runs["uniform-budget"] = dataclasses.replace(plain, rank=ru, alpha=_alpha(plain, ru))
        else:
            skipped["uniform-budget"] = f"uniform rank {ru} at the advice's budget is the ladder's rank-{ru}"
    ru_all = None
    if "uniform-all" in cfg.competitors:
        if len(rec.modules) > len(mods):
            ru_all = _uniform_rank_for_params(advice_params, [a.shape for a in rec.modules.values()])
            runs["uniform-all"] = dataclasses.replace(
                plain, rank=ru_all, alpha=_alpha(plain, ru_all), target_modules=sorted(rec.modules)
            )
        else:
            skipped["uniform-all"] = (
                f"the advice adapts all {len(mods)} analysed modules, so it would train uniform-budget (rank {ru})"
            )
    return runs, ru_all, skipped


def plan_runs(cfg: ValidateConfig) -> tuple[dict[str, TrainConfig], dict[str, Any]]:
    """The runs of a validation (before the rival's seeds), by name, and facts about the advice."""
    rec = Recommendation.from_dict(
        read_json(cfg.recommendation, schema="hessrank.recommendation/1"), source=cfg.recommendation
    )
    common = dict(
        lr=cfg.lr,
        lr_scheduler=cfg.lr_scheduler,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        max_train=cfg.max_train,
        max_eval=cfg.max_eval,
        device=cfg.device,
        selection_fraction=cfg.selection_fraction,
        **cfg.extra,
    )
    base = TrainConfig.from_recommendation(cfg.recommendation, data=cfg.data, seed=cfg.seeds[0], **common)
    steps = _resolved_steps(cfg, base)
    base = dataclasses.replace(base, steps=steps, eval_every=cfg.eval_every or max(1, steps // 10))
    runs: dict[str, TrainConfig] = {f"advice-s{s}": dataclasses.replace(base, seed=s) for s in cfg.seeds}
    r = int(rec.global_rank)
    mods = rec.adapted
    shapes = [a.shape for a in mods.values()]
    full = min(min(o, i) for o, i in shapes)
    ladder = sorted({min(full, max(1, round(r * m))) for m in cfg.multipliers})
    plain = dataclasses.replace(base, rank_pattern={}, alpha_pattern={})
    for rr in ladder:
        runs[f"rank-{rr}"] = dataclasses.replace(plain, rank=rr, alpha=_alpha(plain, rr))
    advice_params = sum(a.rank * (a.shape[0] + a.shape[1]) for a in mods.values())
    ru = _uniform_rank_for_params(advice_params, shapes)
    comp, ru_all, skipped = _competitor_runs(cfg, plain, rec, advice_params, ru, ladder)
    runs.update(comp)
    for f in cfg.formats:
        if f != base.quantization:
            runs[f"format-{f}"] = dataclasses.replace(base, quantization=f)
    for m in cfg.methods:
        q = "none" if m in ("prefix", "prompt", "bitfit", "full") else base.quantization
        runs[f"method-{m}"] = dataclasses.replace(
            base,
            method=m,
            quantization=q,
            rank_pattern={} if m != "lora" else base.rank_pattern,
            alpha_pattern={} if m != "lora" else base.alpha_pattern,
        )
    facts = {
        "global_rank": r,
        "ladder": ladder,
        "steps": steps,
        "uniform_budget_rank": ru,
        "uniform_all_rank": ru_all,
        "competitors_not_trained": skipped,
        "advice_params": advice_params,
        "format": base.quantization,
        "rec": rec,  # the typed Recommendation
    }
    return runs, facts


def _loss(m: dict[str, Any]) -> float:
    return float(m["train_info"]["metrics"]["eval_loss"])


def _seed(m: dict[str, Any]) -> int:
    return int(m["run_info"]["train_config"]["seed"])


def _acc(m: dict[str, Any]) -> float | None:
    return m["train_info"]["metrics"].get("accuracy")


def _trained_otherwise(folder: Path, tc: TrainConfig) -> TrainConfig | None:
    """The configuration run folder ``folder`` trained, when it trains something other than ``tc`` (training keys
    differ: steps alone do not); None for an empty folder or the same training."""
    made = folder / "train_config.json"
    if not made.exists():
        return None
    held = TrainConfig.from_dict(read_json(made)["config"])
    return held if _training_key(held) != _training_key(tc) else None


def _plateaued(m: dict[str, Any]) -> bool:
    ti = m["train_info"]
    return plateau_status(ti.get("eval_curve") or [], ti["steps"], ti.get("best_step"))


def _check_folder(cfg: ValidateConfig, out: Path, runs: dict[str, TrainConfig], overwrite: bool) -> None:
    """Refuse a folder holding a validation under another recipe or of another advice."""
    held = None if overwrite else stored_config(out / "validate_config.json", _normalise, "validation", strict=False)
    if held is None:
        return
    # fields that only add or remove runs (more seeds, another format, ...) extend a validation: the finished
    # runs stay valid; anything else (steps, lr, data, ...) would compare runs made under different recipes
    # where the recommendation file lies is no part of the recipe: a validation moved or restored elsewhere (with
    # its analysis) resumes; what the file advises is checked below, by what the advice runs trained
    differ = [k for k in differing_fields(held[1], cfg.to_dict()) if k != "recommendation"]
    recipe = [k for k in differ if k not in EXTENDING_FIELDS]
    if recipe:
        refuse_other_config(out, "a validation", recipe)
    if differ:
        log.info("extending the validation in %s (%s changed)", out, ", ".join(differ))
    # the advice is what its runs train: compare with what the advice runs already made trained (re-running
    # `recommend` on the same analysis rewrites the file, its time stamp, and must not block a resume)
    for name, tc in runs.items():
        if name.startswith("advice-") and _trained_otherwise(out / "runs" / name, tc) is not None:
            raise HessrankError(
                f"{out}: the advice in {cfg.recommendation} changed since this validation started ({name} "
                "trained a different configuration); pass --overwrite to validate the new advice"
            )


#: the schedule of a validation folder written before ``lr_scheduler`` was a field (every run then trained on it)
SCHEDULE_BEFORE_THE_FIELD = "constant_with_warmup"


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    """A stored validation config read through :class:`ValidateConfig` (missing fields at their defaults, except
    a missing ``lr_scheduler``: such a folder was trained on :data:`SCHEDULE_BEFORE_THE_FIELD`; a missing ``lr_grid``:
    :data:`LR_GRID_BEFORE_THE_FIELD`)."""
    old = {"lr_scheduler": SCHEDULE_BEFORE_THE_FIELD, "lr_grid": list(LR_GRID_BEFORE_THE_FIELD)}
    return ValidateConfig.from_dict(old | config).to_dict()


class _Runner:
    """Trains planned runs (reusing identical ones) and extends those still improving."""

    def __init__(self, cfg: ValidateConfig, out: Path, progress: bool, overwrite: bool = False, backend: Any = None):
        self.cfg, self.out, self.progress = cfg, out, progress
        self.backend = backend  #: hessrank.trainer.backends: trains a batch of runs ahead (Ray); None: all in process
        self.overwrite = overwrite  #: replace a run folder that trained something else (validate --overwrite)
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.configs: dict[str, TrainConfig] = {}
        self.alias: dict[str, str] = {}  #: run -> the earlier run that trains the same thing
        self.extended: dict[str, int] = {}
        self.planned_steps: dict[str, int] = {}  #: run -> the step count it was planned with
        self.folders: dict[str, Path] = {}  #: run -> the folder of the training its result comes from
        self.trainings: dict[str, dict[Path, dict[str, Any]]] = {}  #: run -> {folder: metrics} of each training
        self.shorter_kept: set[str] = set()  #: runs whose extension did worse on the selection half (see _judge)
        self.rate: dict[str, float] = {}  #: run -> the multiple of the recipe's rate its result was trained at

    def folder(self, name: str, tc: TrainConfig) -> Path:
        """``runs/<name>``; a run extended under a decaying schedule is a new training from the start, kept beside
        the shorter one in ``runs/<name>@<steps>`` (a constant schedule extends the run in its own folder)."""
        planned = self.planned_steps.setdefault(name, int(tc.steps or 0))
        if resumable(tc.lr_scheduler) or int(tc.steps or 0) == planned:
            return self.out / "runs" / name
        return self.out / "runs" / f"{name}@{tc.steps}"

    def _refuse_changed_plan(self, name: str, folder: Path, tc: TrainConfig) -> None:
        """A run folder that trained something other than what this validation now plans for it (e.g. after an
        upgrade changed a competitor's budget) is an error naming the run, not a run silently skipped: resume with
        --overwrite retrains the runs that changed and keeps those that still match."""
        held = None if self.overwrite else _trained_otherwise(folder, tc)
        if held is not None:
            diff = [k for k in differing_fields(held.to_dict(), tc.to_dict()) if k != "steps"]
            raise HessrankError(
                f"{folder}: run '{name}' was trained with another configuration than this validation now plans for "
                f"it (differs in: {', '.join(diff) or 'ranks'}); pass --overwrite to retrain the runs that changed "
                "(finished runs that still match are kept)"
            )

    def _one(self, name: str, tc: TrainConfig) -> None:
        folder = self.folder(name, tc)
        self._refuse_changed_plan(name, folder, tc)
        self._move_longer_aside(folder, tc)
        replace = self._replaces(folder, tc)
        try:
            self.results[name] = train(tc, folder, resume=True, overwrite=replace, progress=self.progress)
            self.configs[name], self.folders[name] = tc, folder
            self.trainings.setdefault(name, {})[folder] = self.results[name]
        except HessrankError as e:  # e.g. BitFit on a model without biases: recorded, not fatal
            self.errors[name] = str(e)
            log.warning("run %s skipped: %s", name, e)

    def _move_longer_aside(self, folder: Path, tc: TrainConfig) -> None:
        """Under a decaying schedule, a run's own folder holding the same training planned *longer* than ``tc`` (a
        rival seed trained at its rival's longest steps, as validations did until session 21) is that training's
        extension: it moves to ``runs/<name>@<its steps>``, where the extension chain finds it finished, and the
        planned run trains in ``runs/<name>``. Nothing is deleted."""
        made = folder / "train_config.json"
        if resumable(tc.lr_scheduler) or not made.exists() or _trained_otherwise(folder, tc) is not None:
            return
        held = int(TrainConfig.from_dict(read_json(made)["config"]).steps or 0)
        if tc.steps is None or held <= int(tc.steps):
            return
        target = folder.with_name(f"{folder.name}@{held}")
        if target.exists():
            raise HessrankError(
                f"{folder}: holds a {held}-step training of run '{folder.name}', planned at {tc.steps} steps, and "
                f"{target} exists too; move one of them away"
            )
        log.info("%s holds the %d-step training of this run: moved to %s (its extension)", folder, held, target)
        folder.rename(target)

    def _replaces(self, folder: Path, tc: TrainConfig) -> bool:
        """With --overwrite a run folder that trained another configuration is replaced; the same training (an
        extension differs in steps only) resumes."""
        return self.overwrite and _trained_otherwise(folder, tc) is not None

    def _prefetch(self, jobs: list[tuple[str, TrainConfig]]) -> None:
        """Let the backend train ``jobs`` ahead, in parallel; the logic below then finds them finished (train's
        resume rules) and treats them as it would in process. No backend: nothing ahead."""
        if self.backend is None or not jobs:
            return
        for n, tc in jobs:
            self._refuse_changed_plan(n, self.folder(n, tc), tc)
            self._move_longer_aside(self.folder(n, tc), tc)
        self.backend.prefetch([(n, tc, self.folder(n, tc), self._replaces(self.folder(n, tc), tc)) for n, tc in jobs])

    def _distinct(self, runs: dict[str, TrainConfig]) -> list[tuple[str, TrainConfig]]:
        """The runs of ``runs`` that :meth:`run_all` trains rather than aliases (first of each training)."""
        seen = {_training_key(tc) for k, tc in self.configs.items() if k in self.results}
        out = []
        for name, tc in runs.items():
            key = _training_key(tc)
            if key not in seen or (self.out / "runs" / name / "metrics.json").exists():
                out.append((name, tc))
            seen.add(key)
        return out

    def run_all(self, runs: dict[str, TrainConfig]) -> None:
        """Train ``runs`` at every rate of the grid (:meth:`_merge_rates`), then each run is the best of its rates."""
        grid = sorted(self.cfg.lr_grid, key=lambda m: (m != 1.0, m))
        # a run that will reuse a run already merged (folk-16 = rank-16 trained in an earlier call) gets no rates of
        # its own: it takes its twin's merged result (_share_aliases), whose rates were trained then
        done = {_training_key(tc) for k, tc in self.configs.items() if k in self.results}
        self._run_rates(
            {
                _rate_name(n, m): _with_rate(tc, m)
                for n, tc in runs.items()
                for m in grid
                if m == 1.0 or _training_key(tc) not in done or (self.out / "runs" / n / "metrics.json").exists()
            }
        )
        self._merge_rates(runs, grid)

    def _merge_rates(self, runs: dict[str, TrainConfig], grid: list[float]) -> None:
        """Each run of ``runs`` becomes the training, over all its rates (``runs/<name>~lr<m>x``) and their
        extensions, whose best checkpoint has the lowest selection-half loss — the rule :meth:`_judge` applies to
        one rate's extensions, extended to the rates of the grid. Its :attr:`configs` entry stays at the recipe's
        rate (the rival's other seeds are planned from it and get the grid again); the other rates' entries are
        folded in (:attr:`trainings` of the run holds them all, so :meth:`compute_seconds` counts them)."""
        for n in runs:
            for m in grid:
                v = _rate_name(n, m)
                if n in self.alias or v == n or v not in self.results:
                    continue
                if n not in self.results or _selection_loss(self.results[v]) < _selection_loss(self.results[n]):
                    self.configs.setdefault(n, dataclasses.replace(self.configs[v], lr=runs[n].lr))
                    self.results[n], self.folders[n], self.rate[n] = self.results[v], self.folders[v], m
                    self.extended[n] = self.extended.get(v, 0)
                    self.shorter_kept.discard(n)
                    if v in self.shorter_kept:
                        self.shorter_kept.add(n)
                self.trainings.setdefault(n, {}).update(self.trainings.get(v, {}))
            self.rate.setdefault(n, 1.0)
        for n in runs:
            for m in grid:
                v = _rate_name(n, m)
                if v != n:  # a rate that failed stays in errors under its own name
                    for d in (self.results, self.configs, self.folders, self.extended, self.alias):
                        d.pop(v, None)
                    self.shorter_kept.discard(v)
        self._share_aliases()

    def _run_rates(self, runs: dict[str, TrainConfig]) -> None:
        """Train ``runs``; a run that trains what an earlier run trains (and has no folder of its own) reuses it;
        then extend every run still improving, doubling its steps, up to ``max_extensions`` times (resumed under a
        constant schedule, retrained from the start under a decaying one: :meth:`folder`)."""
        self._prefetch(self._distinct(runs) if self.backend is not None else [])
        keys = {k: _training_key(tc) for k, tc in self.configs.items()}
        for i, (name, tc) in enumerate(runs.items()):
            key = _training_key(tc)
            same = next((k for k, v in keys.items() if v == key and k in self.results), None)
            if same is not None and not (self.out / "runs" / name / "metrics.json").exists():
                log.info("validation run %d/%d: %s (the same training as %s)", i + 1, len(runs), name, same)
                self.alias[name] = self.alias.get(same, same)
            else:
                log.info("validation run %d/%d: %s", i + 1, len(runs), name)
                self._one(name, tc)
            keys[name] = key
        for _ in range(self.cfg.max_extensions):
            self._share_aliases()
            # AdaLoRA's rank budget schedule is tied to its total steps: it is judged as trained, never extended
            todo = [
                n
                for n in runs
                if n in self.results
                and n not in self.alias
                and self.configs[n].method != "adalora"
                and not _plateaued(self.results[n])
            ]
            if not todo:
                break
            self._prefetch(
                [(n, dataclasses.replace(self.configs[n], steps=2 * int(self.configs[n].steps or 0))) for n in todo]
            )
            for n in todo:
                longer = dataclasses.replace(self.configs[n], steps=2 * int(self.configs[n].steps or 0))
                log.info("extending %s to %d steps (still improving at its last evaluation)", n, longer.steps)
                self.extended[n] = self.extended.get(n, 0) + 1
                self._one(n, longer)
        self._judge([n for n in runs if n in self.results and n not in self.alias])
        self._share_aliases()

    def _judge(self, names: list[str]) -> None:
        """Each extended run is judged by the training (the planned one or an extension, each its own folder under
        a decaying schedule) whose best checkpoint has the lowest loss on the *selection* half of the held-out
        split — the criterion early stopping already chose each training's checkpoint by, extended to the
        trainings of one configuration. An extension thus replaces a run only by one that did better on the
        examples that choose; the reported half never decides. A run kept at a shorter training is settled: more
        steps did not help it (:attr:`shorter_kept`). The extension chain itself follows the longest training's
        configuration (:attr:`configs`); the rival's other seeds start from its planned steps.

        Until session 20 the longest training was judged; over the 8 extended runs of the archived SmolLM2 and
        AG News validations a shorter training had the lower selection loss in 7 (reports/validation.md)."""
        for n in names:
            tr = self.trainings.get(n, {})
            if len(tr) < 2:
                continue
            best = min(tr, key=lambda f: (_selection_loss(tr[f]), -int(tr[f]["train_info"]["steps"])))
            if best != self.folders[n]:
                self.results[n], self.folders[n] = tr[best], best
                self.shorter_kept.add(n)

    def compute_seconds(self, name: str) -> float:
        """Training seconds of every training of run ``name`` (the planned one and its extensions: what running it
        under this protocol costs), or of the run it reuses."""
        src = self.alias.get(name, name)
        tr = self.trainings.get(src) or {self.folders[src]: self.results[src]}
        return float(sum(m["train_info"]["train_time"] for m in tr.values()))

    def _share_aliases(self) -> None:
        for name, same in self.alias.items():
            if same in self.results:
                self.results[name], self.configs[name] = self.results[same], self.configs[same]
                self.folders[name] = self.folders[same]
                self.extended[name] = self.extended.get(same, 0)
                self.rate[name] = self.rate.get(same, 1.0)
                if same in self.shorter_kept:
                    self.shorter_kept.add(name)
                else:  # its twin may have been merged to another rate since
                    self.shorter_kept.discard(name)


def validate(
    cfg: ValidateConfig,
    out: str | Path,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    backend: Any = None,
) -> dict[str, Any]:
    """Run (or resume) a validation into ``out``; returns the ``validation.json`` document.

    ``backend`` (:mod:`hessrank.trainer.backends`, e.g. ``make_backend("ray")``) trains independent runs ahead in
    parallel; ``None`` trains every run in this process. The result does not depend on it."""
    out = Path(out)
    rec_path = Path(cfg.recommendation)
    if not rec_path.is_file():
        raise HessrankError(f"{rec_path}: recommendation file not found (run hessrank recommend first)")
    with folder_lock(out, "validate"):
        return _validate(cfg, out, rec_path, resume, overwrite, progress, backend)


def _validate(
    cfg: ValidateConfig,
    out: Path,
    rec_path: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    backend: Any = None,
) -> dict[str, Any]:
    rec_hash = hashlib.sha256(rec_path.read_bytes()).hexdigest()[:16]
    runs, facts = plan_runs(cfg)
    _check_folder(cfg, out, runs, overwrite)
    ensure_new_or_resumable(out, "validate_config.json", resume=resume, overwrite=overwrite)
    write_config(
        out / "validate_config.json", "hessrank.validate_config/2", cfg.to_dict(), recommendation_sha256=rec_hash
    )
    started = time.time()
    runner = _Runner(cfg, out, progress, overwrite=overwrite, backend=backend)
    # what the verdict needs first (the advice, the ladder, then the rival's seeds), the other competitors after:
    # a validation stopped part-way has its verdict's runs done; the result does not depend on the order
    verdict_runs = {k: v for k, v in runs.items() if k.startswith(("advice-", "rank-"))}
    runner.run_all(verdict_runs)
    first = f"advice-s{cfg.seeds[0]}"
    # the closest rival gets the other seeds too (a rung identical to the advice is the advice, not a rival)
    rival = closest_rival(runner.results, {k: _training_key(v) for k, v in runner.configs.items()}, first)
    if rival is not None:
        # the rival's other seeds follow the protocol its first seed did: the planned steps, extended when still
        # improving, judged by the selection half (until session 21 they trained at its longest training's steps)
        base = dataclasses.replace(runner.configs[rival], steps=runner.planned_steps[rival])
        runner.run_all({f"rival-s{s}": dataclasses.replace(base, seed=s) for s in cfg.seeds[1:]})
    runner.run_all({k: v for k, v in runs.items() if k not in verdict_runs})
    doc = summarise(cfg, facts, runner, rival, started)
    write_json(out / "validation.json", doc)
    atomic_write(out / "validation.md", lambda f: f.write(table_markdown(doc)))
    return doc


def closest_rival(results: dict[str, dict[str, Any]], keys: dict[str, Any], advice: str) -> str | None:
    """The ladder rung with the lowest *selection*-half loss at its best checkpoint (:func:`rates.selection_loss`)
    that does not train what the advice trains (``keys``: each run's :func:`_training_key`; an aliased rung shares
    the advice's key).

    Choosing the rival is a model selection like choosing a checkpoint or a rate, so it is made on the examples
    that made those, not on the reported half: the minimum of several noisy reported losses is biased low (the
    winner's curse; Cawley & Talbot 2010, "On over-fitting in model selection and subsequent selection bias in
    performance evaluation", JMLR 11), and the verdict then pairs that same reported loss at the first seed with
    the advice's, which would tilt it toward "too small". Until session 23 the rival was the lowest *reported*
    loss. With ``selection_fraction`` 0 both are the same number."""
    cands = [
        k for k in results if k.startswith("rank-") and keys.get(k) is not None and keys.get(k) != keys.get(advice)
    ]
    return min(cands, key=lambda k: (_selection_loss(results[k]), _loss(results[k]))) if cands else None


# ----------------------------------------------------------------------------------------------------------
# the verdict
# ----------------------------------------------------------------------------------------------------------


def paired_differences(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """dₛ = a[s] − b[s] over the seeds both have: per seed, mean, sd, standard error (None below 2 seeds)."""
    seeds = sorted(s for s in a if s in b)
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    n = len(seeds)
    sd = float(d.std(ddof=1)) if n > 1 else None
    ref = float(np.mean([b[s] for s in seeds])) if n else None
    return {
        "minus_advice": {str(s): float(x) for s, x in zip(seeds, d)},
        "n": n,
        "mean": float(d.mean()) if n else None,
        "sd": sd,
        "se": sd / math.sqrt(n) if sd is not None else None,
        "relative": float(d.mean()) / ref if n and ref else None,
    }


def _by_seed(runs: list[dict[str, Any]]) -> dict[int, float]:
    return {_seed(m): _loss(m) for m in runs}


def knee_reference(runs: list[dict[str, Any]]) -> float | None:
    """The reported loss the knee is measured from: that of the run with the lowest *selection*-half loss among
    ``runs`` (the rungs and the advice at the first seed; ties broken by the reported loss).

    Like the rival (:func:`closest_rival`), the best run is a model selection and is made on the selection half.
    The minimum of the reported losses themselves is biased low (the winner's curse; Cawley & Talbot 2010, JMLR
    11), which raised the bar a rung had to clear, pushed the knee up and made *too large* rarer; until session 24
    the knee was measured from that minimum. The reference is at least that minimum, so the knee can only be
    smaller or equal: the change can make a verdict *too large*, never *right* instead. With
    ``selection_fraction`` 0 both rules are the same."""
    if not runs:
        return None
    return _loss(min(runs, key=lambda m: (_selection_loss(m), _loss(m))))


def _verdict(
    cfg: ValidateConfig,
    adv: dict[int, float],
    adv_params: int,
    ladder: dict[int, dict[str, Any]],
    paired: dict,
    rival_params: int | None = None,
    rival: str | None = None,
    advice_first: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Band, knee and verdict from the paired differences (see the module docstring). A rival better by more than
    the band that trains *fewer* parameters than the advice does not make it "too small": the verdict is then
    "beaten" (a smaller uniform rank does better than the advised allocation). ``advice_first``: the advice's run
    at the first seed (its metrics), a candidate for the knee's reference (:func:`knee_reference`)."""
    who = f"the closest rival ({rival}, the rung best on the selection half)" if rival else "the closest rival"
    s0 = cfg.seeds[0]
    adv_mean = float(np.mean(list(adv.values())))
    scale = min(adv_mean, adv_mean + paired["mean"]) if paired.get("mean") is not None else adv_mean
    se = paired.get("se")
    band = max(cfg.tolerance * scale, 2 * se) if se is not None else cfg.tolerance * scale
    ref = knee_reference(list(ladder.values()) + ([advice_first] if advice_first is not None else []))
    if ref is None:  # no rung finished: the advice's own loss at the first seed
        ref = adv.get(s0, adv_mean)
    knee = min((r for r, m in ladder.items() if _loss(m) <= ref + band + 1e-12), default=None)
    knee_params = ladder[knee]["train_info"]["num_trainable_params"] if knee is not None else None
    mean = paired.get("mean")
    basis = f"paired over {paired['n']} seeds" if paired.get("n", 0) >= 2 else "one seed: no paired spread"
    if mean is not None and mean < -band:
        smaller = rival_params is not None and rival_params < adv_params
        verdict = "beaten" if smaller else "too small"
        why = (
            f"{who} beats the advice by {-mean:.4f} on average seed by seed ({basis}), beyond the band "
            f"{band:.4f} (max of {cfg.tolerance:.0%} and 2x the paired standard error {se or 0:.4f})"
            + (f", with fewer parameters ({rival_params:,} vs {adv_params:,})" if smaller else "")
        )
    elif knee_params is not None and adv_params > 2 * knee_params:
        verdict = "too large"
        why = (
            f"the advice is within the band ({band:.4f}, {basis}) of {who} but trains {adv_params:,} "
            f"parameters, more than twice the knee's {knee_params:,} (rank {knee})"
        )
    else:
        verdict = "right"
        why = (
            f"the advice is within {band:.4f} of {who} ({basis}; rival minus advice "
            f"{0.0 if mean is None else mean:+.4f}) with {adv_params:,} trainable parameters"
            + (f" (knee rank {knee}: {knee_params:,})" if knee else "")
        )
    return {"verdict": verdict, "why": why, "band": band, "knee": knee, "knee_params": knee_params, "knee_ref": ref}


def _competitor_table(
    results: dict[str, dict[str, Any]],
    adv: dict[int, float],
    adv_params: int,
    band: float,
    s0: int,
    keys: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every rival of the advice trained at the first seed, by budget: who wins (by more than the band).

    The difference is L(run) − L(advice) at the first seed, unless the same training (``keys``: each run's training
    key with the seed left out) was also trained at other seeds — the closest rival is, and so is a competitor that
    trains what it trains (folk r = 16 *is* rung 16): then it is the mean of the seed-by-seed differences over every
    seed both have, the quantity the verdict itself uses, so a competitor's row cannot contradict the verdict."""
    keys = keys or {}
    rows = []
    for name, m in results.items():
        if name.startswith(("advice-", "rival-", "format-")) or _seed(m) != s0 or s0 not in adv:
            continue
        first = _loss(m) - adv[s0]
        same = {_seed(o): _loss(o) for n, o in results.items() if keys.get(name) and keys.get(n) == keys[name]}
        seeds = sorted(s for s in same if s in adv) if len(same) > 1 else [s0]
        d = float(np.mean([same[s] - adv[s] for s in seeds])) if len(seeds) > 1 else first
        params = int(m["train_info"]["num_trainable_params"])
        winner = "advice" if d > band else (name if d < -band else "tie")
        rows.append(
            {
                "run": name,
                "method": m["run_info"]["train_config"]["method"],
                "ranks": _rank_label(m["run_info"]["train_config"]),
                "trainable_params": params,
                "eval_loss": _loss(m),
                "minus_advice": d,
                "seeds": len(seeds),
                "minus_advice_first_seed": first,
                "winner": winner,
                "advice_ties_or_beats_at_fewer_params": bool(adv_params <= params and d >= -band),
            }
        )
    return sorted(rows, key=lambda r: (r["trainable_params"], r["run"]))


def _seedless_keys(configs: dict[str, TrainConfig]) -> dict[str, str]:
    """Each run's training key with the seed left out: runs that differ only in seed share it."""
    return {k: _training_key(dataclasses.replace(tc, seed=0)) for k, tc in configs.items()}


def _quant_after_training(cfg: ValidateConfig, facts: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict:
    """Quantization after training: a format's run minus the 16/32-bit run, beside what the analysis measured."""
    rec: Recommendation = facts["rec"]
    first = results.get(f"advice-s{cfg.seeds[0]}")
    none_run = results.get("format-none") if facts["format"] != "none" else first
    out = {}
    if none_run is None:
        return out
    for k, m in results.items():
        f = m["run_info"]["train_config"]["quantization"]
        if f == "none" or not (k.startswith("format-") or k == f"advice-s{cfg.seeds[0]}"):
            continue
        cand = (rec.quantization or {})["candidates"].get(f, {})
        out[f] = {
            "measured_after_training": _loss(m) - _loss(none_run),
            "predicted_before_training": cand.get("predicted_targets"),
            "measured_before_training": cand.get("measured_whole"),
        }
    return out


#: share of the verdict's runs at one end of the learning-rate grid above which the grid likely does not bracket
#: their best rate (``lr_choice``'s ``edge``)
EDGE_SHARE = 0.75


def lr_choice(rows: list[dict[str, Any]], grid: list[float]) -> dict[str, Any] | None:
    """Which multiple of the learning-rate grid each of the verdict's runs (advice, ladder rungs, the rival's seeds:
    the ``runs`` rows named ``advice-*``, ``rank-*``, ``rival-*``) was judged at, and whether they crowd one end.

    A run judged at the grid's highest (lowest) multiple might do better still higher (lower): the grid shows no
    turn there. One such run is expected — every run of a two-point grid sits at an end — but when at least
    :data:`EDGE_SHARE` of the verdict's runs chose the *same* end, the rate that suits this task likely lies beyond
    it, and the verdict compares runs that were all held back the same way. ``edge`` names that end (``"highest"``
    or ``"lowest"``) and ``widen`` the grid that would test it (one more doubling or halving); ``None`` for a
    one-rate validation."""
    if len(grid) < 2:
        return None
    grid = sorted(grid)
    verdict = [r for r in rows if r["run"].startswith(("advice-", "rank-", "rival-"))]
    chosen = {f"{m:g}": sum(1 for r in verdict if float(r.get("lr_multiple", 1.0)) == m) for m in grid}
    lo, hi = grid[0], grid[-1]
    edge, widen = None, None
    if verdict and chosen[f"{hi:g}"] >= EDGE_SHARE * len(verdict):
        edge, widen = "highest", [*grid, 2 * hi]
    elif verdict and chosen[f"{lo:g}"] >= EDGE_SHARE * len(verdict):
        edge, widen = "lowest", [lo / 2, *grid]
    return {"runs": len(verdict), "chosen": chosen, "edge": edge, "widen": widen}


def lr_choice_sentence(choice: dict[str, Any]) -> str:
    """``lr_choice`` in words (validation.md)."""
    counts = ", ".join(f"×{m} by {n}" for m, n in choice["chosen"].items())
    s = f"Learning rate judged per run over the verdict's {choice['runs']} runs: {counts}."
    if choice["edge"]:
        grid = ",".join(f"{m:g}" for m in choice["widen"])
        s += (
            f" **Most chose the grid's {choice['edge']} multiple**: the rate that suits this task may lie beyond the "
            f"grid, and every run was held back the same way; `--lr-grid {grid}` tests it (runs already trained are "
            "kept; should the closest rival change, validate names its seeds' runs and --overwrite retrains them)."
        )
    return s


def _recipe_lr(runner: _Runner, name: str, lr: float | None) -> float | None:
    """The recipe's learning rate (the grid's 1×): ``lr``, or the rate run ``name`` resolved it to."""
    if lr is not None or name not in runner.results:
        return lr
    at = runner.results[name]["run_info"].get("schedule", {}).get("lr")
    return None if at is None else float(at) / runner.rate.get(name, 1.0)


def _rows(runner: _Runner) -> list[dict[str, Any]]:
    rows = []
    for name, m in runner.results.items():
        ti, tc = m["train_info"], m["run_info"]["train_config"]
        rows.append(
            {
                "run": name,
                "method": tc["method"],
                "quantization": tc["quantization"],
                "rank": tc["rank"],
                "ranks": _rank_label(tc),
                "seed": tc["seed"],
                "eval_loss": _loss(m),
                "accuracy": _acc(m),
                "perplexity": ti["metrics"].get("perplexity"),
                "trainable_params": ti["num_trainable_params"],
                "steps": ti["steps"],
                "best_step": ti["best_step"],
                "plateaued": _plateaued(m),
                "extended": runner.extended.get(name, 0),
                "shorter_training_kept": name in runner.shorter_kept,
                "lr_multiple": runner.rate.get(name, 1.0),
                "folder": runner.folders[name].relative_to(runner.out).as_posix(),
                "train_time": ti["train_time"],
                "peak_memory_bytes": ti["peak_memory_bytes"],
            }
        )
    return rows


def summarise(
    cfg: ValidateConfig, facts: dict[str, Any], runner: _Runner, rival: str | None, started: float
) -> dict[str, Any]:
    results = runner.results
    advice = [results[k] for k in results if k.startswith("advice-")]
    if not advice:
        raise HessrankError("no advice run finished; see the errors in the run folders")
    adv = _by_seed(advice)
    adv_params = int(advice[0]["train_info"]["num_trainable_params"])
    ladder = {int(k.split("-")[1]): results[k] for k in results if k.startswith("rank-")}
    rival_runs = [results[k] for k in results if k.startswith("rival-")] + ([results[rival]] if rival else [])
    paired = paired_differences(_by_seed(rival_runs), adv) if rival else {"n": 0, "mean": None, "se": None}
    rival_params = int(results[rival]["train_info"]["num_trainable_params"]) if rival else None
    first = next((m for m in advice if _seed(m) == cfg.seeds[0]), None)
    v = _verdict(cfg, adv, adv_params, ladder, paired, rival_params, rival, advice_first=first)
    judged = {f"rank-{r}": m for r, m in ladder.items()} | {f"advice-s{_seed(m)}": m for m in advice}
    judged |= {k: m for k, m in results.items() if k.startswith("rival-")}  # the rival at the first seed is a rung
    unsettled = sorted(k for k, m in judged.items() if not _plateaued(m) and k not in runner.shorter_kept)
    verdict, provisional, why = v["verdict"], None, v["why"]
    if unsettled:
        provisional, verdict = verdict, "inconclusive"
        why = (
            f"{len(unsettled)} run(s) were still improving after {cfg.max_extensions} extension(s) "
            f"({', '.join(unsettled)}); train longer before judging rank. Provisional: {provisional} — {why}"
        )
    s0 = cfg.seeds[0]
    table = _competitor_table(results, adv, adv_params, v["band"], s0, _seedless_keys(runner.configs))
    ladder_params = sorted(int(m["train_info"]["num_trainable_params"]) for m in ladder.values())
    rec: Recommendation = facts["rec"]
    rows = _rows(runner)
    an_seconds = rec.analysis.get("seconds_units")
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(),
        "recipe": {
            "steps": facts["steps"],
            "lr": _recipe_lr(runner, f"advice-s{s0}", cfg.lr),
            "lr_grid": list(cfg.lr_grid),
            "lr_scheduler": cfg.lr_scheduler,
            "batch_size": cfg.batch_size,
            "alpha": _alpha_rule(results.get(f"advice-s{s0}")),
            "early_stopping": f"best held-out loss, patience {cfg.patience} evaluations"
            + (
                f"; checkpoint chosen on the first {cfg.selection_fraction:g} of the held-out split, loss reported "
                "on the rest"
                if cfg.selection_fraction
                else ""
            ),
            "extensions": _extension_text(cfg.lr_scheduler, cfg.max_extensions),
            "seeds": list(cfg.seeds),
        },
        "advice": {
            "global_rank": facts["global_rank"],
            "trainable_params": adv_params,
            "format": facts["format"],
            "eval_loss_mean": float(np.mean(list(adv.values()))),
            "eval_loss_std": float(np.std(list(adv.values()), ddof=1)) if len(adv) > 1 else None,
            "accuracy": [_acc(m) for m in advice],
            "at_most_median_ladder_params": bool(adv_params <= float(np.median(ladder_params)))
            if ladder_params
            else None,
        },
        "ladder": {
            str(r): {
                "eval_loss": _loss(m),
                "accuracy": _acc(m),
                "trainable_params": m["train_info"]["num_trainable_params"],
            }
            for r, m in sorted(ladder.items())
        },
        "best_rank_run_loss": min((_loss(m) for m in ladder.values()), default=None),
        "knee_rank": v["knee"],
        "knee_params": v["knee_params"],
        "knee_reference_loss": v["knee_ref"],
        "verdict": verdict,
        "provisional_verdict": provisional,
        "unsettled_runs": unsettled,
        "why": why,
        "rival": rival,
        "paired": paired,
        "band": v["band"],
        "competitors": table,
        "competitors_not_trained": facts["competitors_not_trained"],
        "accuracy_note": _accuracy_note(ladder, advice),
        "quantization_after_training": _quant_after_training(cfg, facts, results),
        "cost": {
            "advice_train_time": float(np.mean([m["train_info"]["train_time"] for m in advice])),
            "ladder_train_time": sum(runner.compute_seconds(f"rank-{r}") for r in ladder),
            "analysis_seconds": an_seconds,
            "analysis_settings": {k: rec.analysis["config"].get(k) for k in ("top_k", "batch_size", "num_batches")},
        },
        "runs": rows,
        "lr_choice": lr_choice(rows, [float(m) for m in cfg.lr_grid]),
        "errors": runner.errors,
        "seconds": time.time() - started,
    }
    return doc


def _accuracy_note(ladder: dict[int, dict[str, Any]], advice: list[dict[str, Any]]) -> str | None:
    accs = {f"rank-{r}": _acc(m) for r, m in ladder.items() if _acc(m) is not None}
    if not accs or _acc(advice[0]) is None:
        return None
    best_acc = max(accs, key=lambda k: accs[k])
    best_loss = f"rank-{min(ladder, key=lambda r: _loss(ladder[r]))}"
    if best_acc == best_loss:
        return None
    return (
        f"loss and accuracy disagree: best loss {best_loss}, best accuracy {best_acc} ({accs[best_acc]:.3f}); "
        "the verdict uses loss"
    )


def knee_sentence(doc: dict[str, Any]) -> str:
    """The knee in words; with no knee (``knee_rank`` null) the advice at the first seed was the best run and
    beat every rung by more than the band, which the sentence says instead of printing ``None``. A validation
    written before session 24 (no ``knee_reference_loss``) measured the knee from the lowest reported loss at the
    first seed, and its sentence says so."""
    if doc.get("knee_reference_loss") is not None:
        within = (
            f"within {doc['band']:.4f} of the run best on the selection half at the first seed "
            f"(reported loss {doc['knee_reference_loss']:.4f})"
        )
    else:
        within = f"within {doc['band']:.4f} of the best run at the first seed"
    if doc.get("knee_rank") is None:
        return f"Knee rank r*: none — no ladder rank is {within} (the advice is better than every rung)."
    return f"Knee rank r* = {doc['knee_rank']} (smallest ladder rank {within})."


def table_markdown(doc: dict[str, Any]) -> str:
    """The validation as Markdown: the runs, the verdict, who wins at which budget, the cost."""
    rc = doc["recipe"]
    ext = str(rc["extensions"]).removeprefix("steps ")
    grid = [float(m) for m in rc.get("lr_grid") or [1.0]]
    rates = (
        f"lr {rc['lr']} × {{{', '.join(f'{m:g}' for m in grid)}}} ({rc['lr_scheduler']}; each run at the rate whose "
        "best checkpoint has the lower selection loss)"
        if len(grid) > 1
        else f"lr {rc['lr']} ({rc['lr_scheduler']})"
    )
    lr_col = len(grid) > 1
    lines = [
        "# hessrank validation",
        "",
        f"Recipe: {rc['steps']} steps ({ext}), {rates}, batch {rc['batch_size']}, "
        f"alpha = {rc['alpha']}, early stopping on the held-out loss"
        + (
            f" (checkpoint chosen on the first {doc['config']['selection_fraction']:g} of the held-out split, "
            "loss reported on the rest)"
            if doc["config"].get("selection_fraction")
            else ""
        )
        + f", seeds {rc['seeds']}.",
        "",
        "| run | method | format | rank | seed | "
        + ("lr × | " if lr_col else "")
        + "held-out loss | accuracy | trainable params | steps | best step | plateau | train s |",
        "|---|---|---|---:|---:|" + ("---:|" if lr_col else "") + "---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted(doc["runs"], key=lambda r: r["run"]):
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['quantization']} | {r['ranks']} | {r['seed']} | "
            + (f"{r.get('lr_multiple', 1.0):g} | " if lr_col else "")
            + f"{r['eval_loss']:.4f} | {acc} | {r['trainable_params']:,} | {r['steps']} | {r['best_step']} | "
            f"{'yes' if r['plateaued'] else 'no'} | {r['train_time']:.0f} |"
        )
    lines += ["", f"**Verdict: {doc['verdict']}** — {doc['why']}."]
    p = doc.get("paired") or {}
    if p.get("n"):
        per = ", ".join(f"{d:+.4f} (seed {s})" for s, d in p["minus_advice"].items())
        rel = "" if p["relative"] is None else f", {p['relative']:+.1%} of the advice's loss"
        lines.append(f"Paired by seed, {doc['rival']} minus advice: {per}; mean {p['mean']:+.4f}{rel}.")
    lines.append(knee_sentence(doc))
    if doc.get("lr_choice"):
        lines.append(lr_choice_sentence(doc["lr_choice"]))
    if doc.get("accuracy_note"):
        lines.append(doc["accuracy_note"] + ".")
    if doc["competitors"]:
        lines += [
            "",
            "Who wins at which budget (first seed, or paired by seed over the seeds a run was trained at; band as "
            "above; negative: better than the advice):",
            "",
            "| run | method | rank | trainable params | held-out loss | minus advice | winner |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        a = doc["advice"]
        lines.append(
            f"| advice | lora | - | {a['trainable_params']:,} | "
            f"{next(r['eval_loss'] for r in doc['runs'] if r['run'] == 'advice-s' + str(rc['seeds'][0])):.4f} | - | - |"
        )
        for r in doc["competitors"]:
            lines.append(
                f"| {r['run']} | {r['method']} | {r['ranks']} | {r['trainable_params']:,} | {r['eval_loss']:.4f} | "
                f"{minus_advice_text(r)} | {r['winner']} |"
            )
        notes = competitor_notes(doc["competitors"])
        lines += ["", *notes, *([""] if notes else [])]
    if doc.get("competitors_not_trained"):
        not_trained = "; ".join(f"{k}: {v}" for k, v in doc["competitors_not_trained"].items())
        lines += [f"Not trained on their own: {not_trained}.", ""]
    for f, q in doc["quantization_after_training"].items():
        mb = q["measured_before_training"]
        lines.append(
            f"Quantization {f}: held-out loss change after training {q['measured_after_training']:+.4f}; "
            f"before training measured {mb if mb is None else f'{mb:+.4f}'}."
        )
    c = doc["cost"]
    an_s = c.get("analysis_seconds")
    lt = c["ladder_train_time"]
    lines.append(
        f"Cost: analysis {an_s:.0f} s = {an_s / lt:.1%} of the rank ladder's training ({lt:.0f} s); one advice run "
        f"{c['advice_train_time']:.0f} s."
        if an_s is not None and lt > 0
        else f"Cost: rank ladder {lt:.0f} s of training; analysis time not recorded."
    )
    if doc["errors"]:
        lines.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in doc["errors"].items()))
    return "\n".join(lines) + "\n"
