"""Validation: run the advice and its neighbours at equal steps, data and seeds, and give a verdict.

Runs (each a :func:`hessrank.train.train` folder under ``VAL/runs/``, so a killed validation resumes):

* ``advice-s<seed>`` — the recommendation as given (per-module ranks, advised format), for each seed;
* ``rank-<r>`` — the uniform rank ladder {r/4, r/2, r, 2r, 4r} around the advised global rank r (advised format,
  same target modules);
* ``uniform-budget`` — one uniform rank with the advice's trainable-parameter count;
* ``uniform-all`` — when the advice leaves analysed modules without an adapter: one uniform rank on *every*
  analysed module at about the advice's parameter count (what a user without hessrank would train);
* ``format-<f>`` — the advised ranks in other weight formats (16/32-bit, int8, NF4);
* ``method-<m>`` — other methods (IA³, prefix, prompt, BitFit, full, rsLoRA, DoRA, EVA, AdaLoRA);
* ``rival-s<seed>`` — the closest rival (the best non-advice rank run) again with the other seeds.

Every rung is trained with early stopping on the held-out loss and judged at its best checkpoint, since a short
ladder measures optimisation speed rather than capacity (``../shared/VALIDATION.md``).

**Knee and verdict.** r* is the smallest ladder rank whose held-out loss is within ``tolerance`` (relative, default
2%) of the best rank run (ladder, uniform-budget and advice; not uniform-all). A run still improving at its last
evaluation (best checkpoint at the last step and the last two held-out losses more than 1% apart) makes the verdict
*inconclusive*; the would-be verdict is kept as provisional. The advice is *right* when its loss (mean over seeds)
is within tolerance of that best and it costs at most twice the knee's trainable parameters; *too small* when its
loss is worse than the tolerance allows; *too large* when it is within tolerance but costs more than twice the
knee. The tolerance band is the larger of ``tolerance``·best and twice the seed-to-seed standard deviation of the
repeated runs (advice and rival seeds): differences inside the seed noise cannot rank two runs. Loss decides;
accuracy is reported beside it, and where they disagree the report says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import HessrankError
from .io import atomic_write, ensure_new_or_resumable, read_json, write_json
from .train import TrainConfig, train

log = logging.getLogger(__name__)

SCHEMA = "hessrank.validation/1"
DEFAULT_METHODS = ("ia3", "prompt", "rslora", "dora")


@dataclass(frozen=True)
class ValidateConfig:
    recommendation: str
    data: str | None = None
    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 16
    eval_every: int = 50
    patience: int | None = None
    max_train: int | None = 3000
    max_eval: int | None = 500
    seeds: tuple[int, ...] = (0, 1)
    multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    formats: tuple[str, ...] = ("none", "llm.int8", "nf4")
    methods: tuple[str, ...] = DEFAULT_METHODS
    tolerance: float = 0.02
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  #: further TrainConfig overrides for every run

    def __post_init__(self) -> None:
        if not self.seeds:
            raise HessrankError("validate needs at least one seed")
        if not 0 < self.tolerance < 1:
            raise HessrankError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if any(m <= 0 for m in self.multipliers):
            raise HessrankError("ladder multipliers must be positive")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


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


EXTENDING_FIELDS = frozenset({"seeds", "multipliers", "formats", "methods", "tolerance"})


def _training_key(tc: TrainConfig) -> str:
    """What a LoRA run trains, independent of how its ranks are spelled (global rank vs ``rank_pattern``)."""
    d = tc.to_dict()
    targets = d.get("target_modules")
    if d.get("method") != "lora" or not isinstance(targets, list):
        return json.dumps(d, sort_keys=True, default=str)
    pat, apat = d.get("rank_pattern") or {}, d.get("alpha_pattern") or {}
    per = {t: (int(pat.get(t, d["rank"])), float(apat.get(t, d["alpha"]))) for t in targets}
    rest = {k: v for k, v in d.items() if k not in ("rank", "alpha", "rank_pattern", "alpha_pattern")}
    return json.dumps([per, rest], sort_keys=True, default=str)


def _uniform_rank_for_params(params: int, shapes: list[tuple[int, int]]) -> int:
    per_rank = sum(o + i for o, i in shapes)
    return max(1, round(params / max(per_rank, 1)))


def plan_runs(cfg: ValidateConfig) -> tuple[dict[str, TrainConfig], dict[str, Any]]:
    """The runs of a validation, by name, and facts about the advice they are built around."""
    rec = read_json(cfg.recommendation, schema="hessrank.recommendation/1")
    common = dict(
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        max_train=cfg.max_train,
        max_eval=cfg.max_eval,
        device=cfg.device,
        **cfg.extra,
    )
    # every run shares the first seed unless it is a repeat of the advice or of its rival
    base = TrainConfig.from_recommendation(cfg.recommendation, data=cfg.data, seed=cfg.seeds[0], **common)
    runs: dict[str, TrainConfig] = {}
    for s in cfg.seeds:
        runs[f"advice-s{s}"] = dataclasses.replace(base, seed=s)
    r = int(rec["global_rank"])
    mods = {m: d for m, d in rec["modules"].items() if d["rank"] > 0}
    shapes = [tuple(d["shape"]) for d in mods.values()]
    full = min(min(o, i) for o, i in shapes)
    ladder = sorted({min(full, max(1, round(r * m))) for m in cfg.multipliers})
    plain = dataclasses.replace(base, rank_pattern={}, alpha_pattern={})
    for rr in ladder:
        runs[f"rank-{rr}"] = dataclasses.replace(plain, rank=rr, alpha=2 * rr)
    advice_params = sum(d["rank"] * (d["shape"][0] + d["shape"][1]) for d in mods.values())
    ru = _uniform_rank_for_params(advice_params, shapes)
    if ru not in ladder:
        runs["uniform-budget"] = dataclasses.replace(plain, rank=ru, alpha=2 * ru)
    # the advice may leave analysed modules without an adapter: test that choice against what a user without
    # hessrank does, one uniform rank on every analysed module at (about) the advice's parameter count
    all_mods = rec["modules"]
    ru_all = None
    if len(all_mods) > len(mods):
        ru_all = _uniform_rank_for_params(advice_params, [tuple(d["shape"]) for d in all_mods.values()])
        runs["uniform-all"] = dataclasses.replace(plain, rank=ru_all, alpha=2 * ru_all, target_modules=sorted(all_mods))
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
        "uniform_budget_rank": ru,
        "uniform_all_rank": ru_all,
        "advice_params": advice_params,
        "format": base.quantization,
        "rec": rec,
    }
    return runs, facts


def _loss(m: dict[str, Any]) -> float:
    return float(m["train_info"]["metrics"]["eval_loss"])


def _seed(m: dict[str, Any]) -> int:
    return int(m["run_info"]["train_config"]["seed"])


def _acc(m: dict[str, Any]) -> float | None:
    return m["train_info"]["metrics"].get("accuracy")


def _plateaued(m: dict[str, Any], rel: float = 0.01) -> bool:
    """The run's best held-out loss came before its last evaluation, or the last two evaluations differ by less
    than ``rel`` (relative): early stopping found a minimum, or the curve has flattened."""
    curve = m["train_info"].get("eval_curve") or []
    steps = m["train_info"]["steps"]
    best = m["train_info"].get("best_step")
    if best is not None and best < steps:
        return True
    if len(curve) >= 2:
        a, b = curve[-2]["eval_loss"], curve[-1]["eval_loss"]
        return abs(a - b) <= rel * max(abs(a), 1e-12)
    return False


def validate(
    cfg: ValidateConfig, out: str | Path, resume: bool = True, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) a validation into ``out``; returns the ``validation.json`` document."""
    out = Path(out)
    cfile = out / "validate_config.json"
    rec_path = Path(cfg.recommendation)
    if not rec_path.is_file():
        raise HessrankError(f"{rec_path}: recommendation file not found (run hessrank recommend first)")
    rec_hash = hashlib.sha256(rec_path.read_bytes()).hexdigest()[:16]
    runs, facts = plan_runs(cfg)
    if cfile.exists() and not overwrite:
        old = read_json(cfile)
        old_cfg, new_cfg = dict(old.get("config") or {}), cfg.to_dict()
        # fields that only add or remove runs (more seeds, another format, ...) extend a validation: the finished
        # runs stay valid; anything else (steps, lr, data, ...) would compare runs made under different recipes
        differ = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        recipe = [k for k in differ if k not in EXTENDING_FIELDS]
        if recipe:
            raise HessrankError(
                f"{out}: holds a validation with a different configuration (differs in: {', '.join(recipe)}); "
                "pass --overwrite or choose another --out"
            )
        if differ:
            log.info("extending the validation in %s (%s changed)", out, ", ".join(differ))
        # the advice is what its runs train: compare with what the advice runs already made trained (re-running
        # `recommend` on the same analysis rewrites the file, its time stamp, and must not block a resume)
        for name, tc in runs.items():
            made = out / "runs" / name / "train_config.json"
            if name.startswith("advice-") and made.exists() and read_json(made).get("config") != tc.to_dict():
                raise HessrankError(
                    f"{out}: the advice in {rec_path} changed since this validation started ({name} trained a "
                    "different configuration); pass --overwrite to validate the new advice"
                )
    ensure_new_or_resumable(out, "validate_config.json", resume=resume, overwrite=overwrite)
    write_json(
        cfile,
        {
            "schema": "hessrank.validate_config/1",
            "config": cfg.to_dict(),
            "recommendation_sha256": rec_hash,
        },
    )
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def run(name: str, tc: TrainConfig) -> None:
        try:
            results[name] = train(tc, out / "runs" / name, resume=True, overwrite=overwrite, progress=progress)
        except HessrankError as e:  # e.g. BitFit on a model without biases: recorded, not fatal
            errors[name] = str(e)
            log.warning("run %s skipped: %s", name, e)

    names = list(runs)
    # a rung that trains exactly what the advice trains (same modules, ranks, alphas, everything else) reuses the
    # advice's first-seed run instead of repeating it (a finished folder of its own is still used)
    first = f"advice-s{cfg.seeds[0]}"
    alias = {
        n: first
        for n in names
        if n.startswith(("rank-", "uniform-budget"))
        and _training_key(runs[n]) == _training_key(runs[first])
        and not (out / "runs" / n / "metrics.json").exists()
    }
    for i, name in enumerate(names):
        if name in alias:
            log.info("validation run %d/%d: %s (the same training as %s)", i + 1, len(names), name, alias[name])
            continue
        log.info("validation run %d/%d: %s", i + 1, len(names), name)
        run(name, runs[name])
    for name, same in alias.items():
        if same in results:
            results[name] = results[same]
    # the closest rival gets the other seeds too
    # (among runs on the advised modules: uniform-all answers a different question, see module_selection; a rung
    # identical to the advice is the advice, not a rival)
    rival = closest_rival(results, {k: _training_key(runs[k]) for k in results if k in runs}, first)
    if rival is not None:
        for s in cfg.seeds[1:]:
            run(f"rival-s{s}", dataclasses.replace(runs[rival], seed=s))
    doc = summarise(cfg, facts, results, errors, rival, started)
    write_json(out / "validation.json", doc)
    atomic_write(out / "validation.md", lambda f: f.write(table_markdown(doc)))
    return doc


def closest_rival(results: dict[str, dict[str, Any]], keys: dict[str, Any], advice: str) -> str | None:
    """The rank run (ladder rung or uniform-budget) with the lowest held-out loss that does not train what the
    advice trains (``keys``: each run's :func:`_training_key`; an aliased rung shares the advice's key)."""
    cands = [
        k
        for k in results
        if k.startswith(("rank-", "uniform-budget")) and keys.get(k) is not None and keys.get(k) != keys.get(advice)
    ]
    return min(cands, key=lambda k: _loss(results[k])) if cands else None


def summarise(
    cfg: ValidateConfig,
    facts: dict[str, Any],
    results: dict[str, dict[str, Any]],
    errors: dict[str, str],
    rival: str | None,
    started: float,
) -> dict[str, Any]:
    rows = []
    for name, m in results.items():
        ti = m["train_info"]
        rows.append(
            {
                "run": name,
                "method": m["run_info"]["train_config"]["method"],
                "quantization": m["run_info"]["train_config"]["quantization"],
                "rank": m["run_info"]["train_config"]["rank"],
                "ranks": _rank_label(m["run_info"]["train_config"]),
                "seed": m["run_info"]["train_config"]["seed"],
                "eval_loss": _loss(m),
                "accuracy": _acc(m),
                "perplexity": ti["metrics"].get("perplexity"),
                "trainable_params": ti["num_trainable_params"],
                "best_step": ti["best_step"],
                "train_time": ti["train_time"],
                "peak_memory_bytes": ti["peak_memory_bytes"],
            }
        )
    advice = [results[k] for k in results if k.startswith("advice-")]
    if not advice:
        raise HessrankError("no advice run finished; see the errors in the run folders")
    adv_losses = [_loss(m) for m in advice]
    adv_loss = float(np.mean(adv_losses))
    adv_params = advice[0]["train_info"]["num_trainable_params"]
    ladder = {int(k.split("-")[1]): results[k] for k in results if k.startswith("rank-")}
    pool = {
        **{f"rank-{r}": m for r, m in ladder.items()},
        # uniform-all trains more modules than the ladder: it judges the module selection, not the rank, and
        # stays out of the best loss, the knee and the verdict (reported as module_selection)
        **({"uniform-budget": results["uniform-budget"]} if "uniform-budget" in results else {}),
    }
    best_loss = min([_loss(m) for m in pool.values()] + [adv_loss]) if pool else adv_loss
    tol = cfg.tolerance
    # differences smaller than the seed-to-seed spread cannot rank two runs: the band is the larger of the
    # relative tolerance and two standard deviations of the repeated runs (advice seeds, rival seeds)
    rival_runs = [results[k] for k in results if k.startswith("rival-")] + ([results[rival]] if rival else [])
    rival_losses = [_loss(m) for m in rival_runs]
    spreads = [float(np.std(x, ddof=1)) for x in (adv_losses, rival_losses) if len(x) > 1]
    noise = max(spreads) if spreads else 0.0
    band = max(tol * best_loss, 2 * noise)
    within = lambda loss: loss <= best_loss + band + 1e-12
    knee = min((r for r, m in ladder.items() if within(_loss(m))), default=None)
    knee_params = ladder[knee]["train_info"]["num_trainable_params"] if knee is not None else None
    if not within(adv_loss):
        verdict = "too small"
        why = (
            f"the advice's held-out loss {adv_loss:.4f} is {adv_loss / best_loss - 1:+.1%} from the best rank run "
            f"({best_loss:.4f}), beyond the band of {band:.4f} (max of {tol:.0%} and 2x the seed spread {noise:.4f})"
        )
    elif knee_params is not None and adv_params > 2 * knee_params:
        verdict = "too large"
        why = (
            f"the advice is within the band ({band:.4f}) of the best loss but trains {adv_params:,} parameters, "
            f"more than "
            f"twice the knee's {knee_params:,} (rank {knee})"
        )
    else:
        verdict = "right"
        why = (
            f"the advice's loss {adv_loss:.4f} is within {band:.4f} of the best rank run ({best_loss:.4f}; "
            f"band = max of "
            f"{tol:.0%} and 2x the seed spread {noise:.4f}) with "
            f"{adv_params:,} trainable parameters" + (f" (knee rank {knee}: {knee_params:,})" if knee else "")
        )
    # a rung still improving at its last evaluation measured how fast it learns, not what it can reach
    unsettled = [
        k for k, m in {**pool, **{f"advice-{i}": m for i, m in enumerate(advice)}}.items() if not _plateaued(m)
    ]
    provisional = None
    if unsettled:
        provisional = verdict
        verdict = "inconclusive"
        why = (
            f"{len(unsettled)} run(s) were still improving at their last evaluation ({', '.join(sorted(unsettled))}); "
            f"train longer (more --steps) before judging rank. Provisional: {provisional} — {why}"
        )
    # paired by seed: seed-to-seed variation shared by two runs (data order, initialisation) cancels in their
    # difference, which the unpaired band above does not use; reported beside the verdict, not deciding it
    adv_by_seed = {_seed(m): _loss(m) for m in advice}
    others: dict[str, dict[int, float]] = {}
    if rival:
        others[rival] = {_seed(m): _loss(m) for m in rival_runs}
    if "uniform-all" in results:
        others["uniform-all"] = {_seed(results["uniform-all"]): _loss(results["uniform-all"])}
    paired = {}
    for name, by_seed in others.items():
        diffs = {s: by_seed[s] - adv_by_seed[s] for s in sorted(by_seed) if s in adv_by_seed}
        if diffs:
            mean = float(np.mean(list(diffs.values())))
            ref = float(np.mean([adv_by_seed[s] for s in diffs]))
            paired[name] = {
                "minus_advice": {str(s): d for s, d in diffs.items()},
                "mean": mean,
                "relative": mean / ref if ref else None,
            }
    acc_note = None
    accs = {k: _acc(m) for k, m in pool.items() if _acc(m) is not None}
    if accs and _acc(advice[0]) is not None:
        best_acc_run = max(accs, key=lambda k: accs[k])
        best_loss_run = min(pool, key=lambda k: _loss(pool[k]))
        if best_acc_run != best_loss_run:
            acc_note = (
                f"loss and accuracy disagree: best loss {best_loss_run}, best accuracy {best_acc_run} "
                f"({accs[best_acc_run]:.3f}); the verdict uses loss"
            )
    # quantization after training: measured (format-f minus format none) vs predicted from the analysis
    quant_cmp = {}
    rec = facts["rec"]
    none_run = results.get("format-none") if facts["format"] != "none" else advice[0]
    quantized = {k: m for k, m in results.items() if k.startswith("format-") or k == f"advice-s{cfg.seeds[0]}"}
    if none_run is not None:
        for m in quantized.values():
            f = m["run_info"]["train_config"]["quantization"]
            if f == "none":
                continue
            cand = rec["quantization"]["candidates"].get(f, {})
            quant_cmp[f] = {
                "measured_after_training": _loss(m) - _loss(none_run),
                "predicted_before_training": cand.get("predicted_targets"),
                "measured_before_training": cand.get("measured_whole"),
            }
    ladder_time = sum(results[k]["train_info"]["train_time"] for k in results if k.startswith("rank-"))
    selection = None
    if "uniform-all" in results:
        ua = results["uniform-all"]
        selection = {
            "adapted_modules": sum(1 for d in rec["modules"].values() if d["rank"] > 0),
            "analysed_modules": len(rec["modules"]),
            "uniform_all_rank": facts["uniform_all_rank"],
            "uniform_all_params": ua["train_info"]["num_trainable_params"],
            "uniform_all_loss": _loss(ua),
            "advice_loss": adv_loss,
            "advice_params": adv_params,
            "advice_within_band": bool(adv_loss <= _loss(ua) + band + 1e-12),
            "uniform_all_plateaued": _plateaued(ua),
        }
        if not selection["advice_within_band"]:
            why += (
                f"; module selection: one rank-{facts['uniform_all_rank']} adapter on every one of the "
                f"{len(rec['modules'])} analysed modules reached {_loss(ua):.4f}, better than the advice by more "
                f"than the band — leaving modules without an adapter cost quality"
            )
    an_cost = rec["analysis"]["config"]
    an_seconds = rec["analysis"].get("seconds_units")
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(),
        "recipe": {
            "steps": cfg.steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "alpha": "2r",
            "scaling": "alpha/r (rsLoRA only in method-rslora)",
            "early_stopping": "best held-out loss",
            "eval_every": cfg.eval_every,
            "seeds": list(cfg.seeds),
        },
        "advice": {
            "global_rank": facts["global_rank"],
            "trainable_params": adv_params,
            "format": facts["format"],
            "eval_loss_mean": adv_loss,
            "eval_loss_std": float(np.std(adv_losses, ddof=1)) if len(adv_losses) > 1 else None,
            "accuracy": [_acc(m) for m in advice],
        },
        "ladder": {
            str(r): {
                "eval_loss": _loss(m),
                "accuracy": _acc(m),
                "trainable_params": m["train_info"]["num_trainable_params"],
            }
            for r, m in sorted(ladder.items())
        },
        "best_rank_run_loss": best_loss,
        "module_selection": selection,
        "knee_rank": knee,
        "knee_params": knee_params,
        "verdict": verdict,
        "provisional_verdict": provisional,
        "unsettled_runs": sorted(unsettled),
        "why": why,
        "accuracy_note": acc_note,
        "rival": rival,
        "rival_losses": rival_losses,
        "paired": paired,
        "seed_spread": noise,
        "band": band,
        "quantization_after_training": quant_cmp,
        "cost": {
            "advice_train_time": float(np.mean([m["train_info"]["train_time"] for m in advice])),
            "ladder_train_time": ladder_time,
            "analysis_seconds": an_seconds,
            "analysis_settings": {k: an_cost.get(k) for k in ("top_k", "batch_size", "num_batches")},
        },
        "runs": rows,
        "errors": errors,
        "seconds": time.time() - started,
    }
    return doc


def table_markdown(doc: dict[str, Any]) -> str:
    """The validation as a Markdown table plus the verdict."""
    lines = [
        "# hessrank validation",
        "",
        f"Recipe: {doc['recipe']['steps']} steps, lr {doc['recipe']['lr']}, batch {doc['recipe']['batch_size']}, "
        f"alpha = {doc['recipe']['alpha']}, early stopping on the held-out loss (eval every "
        f"{doc['recipe']['eval_every']} steps), seeds {doc['recipe']['seeds']}.",
        "",
        "| run | method | format | rank | seed | held-out loss | accuracy | trainable params | best step | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(doc["runs"], key=lambda r: r["run"]):
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['quantization']} | {r.get('ranks', r['rank'])} | {r['seed']} | "
            f"{r['eval_loss']:.4f} | {acc} | {r['trainable_params']:,} | {r['best_step']} | "
            f"{r['train_time']:.0f} |"
        )
    lines += [
        "",
        f"**Verdict: {doc['verdict']}** — {doc['why']}.",
        f"Knee rank r* = {doc['knee_rank']} (smallest ladder rank within {doc['band']:.4f} of the best rank-run "
        f"loss {doc['best_rank_run_loss']:.4f}; band = max of {doc['config']['tolerance']:.0%} and twice the seed "
        f"spread {doc['seed_spread']:.4f}).",
    ]
    if doc.get("accuracy_note"):
        lines.append(doc["accuracy_note"] + ".")
    for f, q in doc["quantization_after_training"].items():
        mb = q["measured_before_training"]
        lines.append(
            f"Quantization {f}: held-out loss change after training {q['measured_after_training']:+.4f}; "
            f"before training measured {mb if mb is None else f'{mb:+.4f}'}."
        )
    sel = doc.get("module_selection")
    if sel:
        lines.append(
            f"Module selection: the advice adapts {sel['adapted_modules']} of {sel['analysed_modules']} analysed "
            f"modules ({sel['advice_params']:,} trainable, loss {sel['advice_loss']:.4f}); rank "
            f"{sel['uniform_all_rank']} on all of them ({sel['uniform_all_params']:,} trainable) reached "
            f"{sel['uniform_all_loss']:.4f} — the advice is "
            + ("within" if sel["advice_within_band"] else "outside")
            + f" the band ({doc['band']:.4f}) of it."
        )
    for name, p in (doc.get("paired") or {}).items():
        per = ", ".join(f"{d:+.4f} (seed {s})" for s, d in p["minus_advice"].items())
        rel = "" if p["relative"] is None else f", {p['relative']:+.1%} of the advice's loss"
        lines.append(f"Paired by seed, {name} minus advice: {per}; mean {p['mean']:+.4f}{rel}.")
    c = doc["cost"]
    an_s = c.get("analysis_seconds")
    advice_cost = c["advice_train_time"] + (an_s or 0.0)
    lines.append(
        f"Cost: the advice {advice_cost:.0f} s ("
        + (f"analysis {an_s:.0f} s + " if an_s is not None else "analysis time not recorded; ")
        + f"one training run {c['advice_train_time']:.0f} s) vs the rank ladder {c['ladder_train_time']:.0f} s"
        + (f" ({advice_cost / c['ladder_train_time']:.2f}x)." if c["ladder_train_time"] > 0 else ".")
    )
    if doc["errors"]:
        lines.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in doc["errors"].items()))
    return "\n".join(lines) + "\n"
