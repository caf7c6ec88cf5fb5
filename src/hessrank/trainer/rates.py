"""Learning-rate grid: one configuration trained at several multiples of its rate, judged by the selection half.

``validate`` trains every run at each multiple of ``lr_grid`` and keeps the training whose best checkpoint has the
lowest loss on the *selection* half of the held-out split (:func:`selection_loss`); ``hessrank train --lr-grid``
does the same for one configuration, so a user trains the advice by the protocol that validated it.

Why a grid rather than one rate for every run: under rank-stable scaling α/√r one rate does not suit every adapter
equally — on SmolLM2/GSM8K doubling it moved the 248,832-parameter advice five times as far as the 1,843,200-parameter
rank 32 (reports/validation.md, session 19) — so a comparison at one rate measures how well that rate suits each
adapter as much as the adapter. Choosing each configuration's rate on held-out examples it is not reported on is the
usual protocol of method comparisons (each method at its tuned rate), kept small (default ×{1, 2}) because every
rate costs one training.

Layout written by :func:`train_rates` (``hessrank train --lr-grid 1,2 --out R``): ``R/lr1x/``, ``R/lr2x/`` (one run
folder each, as ``hessrank train`` writes) and ``R/lr_grid.json`` (:data:`SCHEMA`): ``rates`` [{``multiple``, ``lr``,
``folder``, ``selection_loss``, ``eval_loss``, ``best_step``, ``steps``}], ``chosen`` (the folder of the lowest
selection loss) and ``selection_fraction``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import HessrankError
from ..io import write_json
from .train import DEFAULT_LR, TrainConfig, train

log = logging.getLogger(__name__)

SCHEMA = "hessrank.lr_grid/1"


def check_grid(grid: tuple[float, ...], flag: str = "lr-grid") -> None:
    """A grid is positive multiples that include 1 (the configuration's own rate)."""
    if 1.0 not in grid or any(not m > 0 for m in grid):
        raise HessrankError(f"{flag} must be positive multiples of the learning rate including 1, got {list(grid)}")
    names = [f"{m:g}" for m in grid]
    if len(set(names)) < len(names):
        raise HessrankError(f"{flag} names a multiple twice: {', '.join(names)}")


def with_rate(tc: TrainConfig, multiple: float) -> TrainConfig:
    """``tc`` at ``multiple`` × its learning rate (the method's default, :data:`DEFAULT_LR`, when ``tc.lr`` is None)."""
    if multiple == 1.0:
        return tc
    return dataclasses.replace(tc, lr=multiple * (tc.lr if tc.lr is not None else DEFAULT_LR[tc.method]))


def selection_loss(m: dict[str, Any]) -> float:
    """A training's held-out loss at its best checkpoint on the examples that chose it (the selection half with
    ``selection_fraction`` > 0, else the whole held-out split): its ``eval_curve`` entry at ``best_step``."""
    ti = m["train_info"]
    at = {e["step"]: e["eval_loss"] for e in ti.get("eval_curve") or []}
    return float(at.get(ti.get("best_step"), ti["metrics"]["eval_loss"]))


def train_rates(
    cfg: TrainConfig,
    out: str | Path,
    grid: tuple[float, ...],
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` at each multiple of ``grid`` into ``out/lr<m>x/`` and write ``out/lr_grid.json``; returns it
    with ``metrics``, the chosen training's ``metrics.json``. Each rate's folder resumes as ``train`` does."""
    check_grid(grid)
    if not cfg.selection_fraction:
        log.warning(
            "choosing the rate by the held-out loss it reports (selection_fraction 0): that loss is biased low; "
            "--selection-fraction 0.5 chooses on one half and reports the other"
        )
    out = Path(out)
    if (out / "train_config.json").exists():
        raise HessrankError(f"{out}: holds a single training run; give --lr-grid another --out folder")
    started = time.time()
    rows, results = [], {}
    for m in sorted(grid):
        folder = out / f"lr{m:g}x"
        tc = with_rate(cfg, m)
        log.info("training at %g x the learning rate (%g) into %s", m, tc.lr or DEFAULT_LR[tc.method], folder)
        res = train(tc, folder, resume=resume, overwrite=overwrite, progress=progress)
        results[folder.name] = res
        ti = res["train_info"]
        rows.append(
            {
                "multiple": m,
                "lr": float(res["run_info"]["schedule"]["lr"]),
                "folder": folder.name,
                "selection_loss": selection_loss(res),
                "eval_loss": float(ti["metrics"]["eval_loss"]),
                "best_step": ti.get("best_step"),
                "steps": ti["steps"],
            }
        )
    chosen = min(rows, key=lambda r: (r["selection_loss"], r["multiple"] != 1.0))["folder"]
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rates": rows,
        "chosen": chosen,
        "selection_fraction": cfg.selection_fraction,
        "seconds": time.time() - started,
    }
    from ..distributed import is_main_process

    if is_main_process():  # under torchrun every rank trains; rank 0 writes
        write_json(out / "lr_grid.json", doc)
    return doc | {"metrics": results[chosen]}
