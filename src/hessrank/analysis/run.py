"""The whole analysis: set-up, the units (one file per step, repeat and scope), resuming.

For each scope (:mod:`.scope`) and each of ``repeats`` independent sets of fixed batches — and once for the
K-FAC rank curves, the quantization sensitivity and the opt-in pilot run — :func:`analyze` writes one unit file
under the output folder's ``units/`` as it finishes (atomic writes), so an interrupted run resumes where it
stopped; then ``analysis.json`` (schema ``hessrank.analysis/1``, documented in ``docs/schemas.md``) and
``analysis.npz`` (arrays) from the units (:mod:`.aggregate`). The folder holds the configuration
(``analysis_config.json``): a rerun with another configuration or changed data is refused.
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
import torch

from .. import __version__
from .. import distributed as _dist
from ..data import (
    Encoder,
    analysis_batches,
    check_labels,
    check_loss_tokens,
    load_dataset,
    resolve_num_labels,
    split_dataset,
)
from ..engine.curvature import HessianOperator
from ..engine.tasks import loss_fn_for
from ..errors import HessrankError, ScopeError
from ..io import (
    atomic_write,
    differing_fields,
    ensure_new_or_resumable,
    refuse_other_config,
    stored_config,
    write_config,
    write_json,
    write_npz,
)
from ..models import linear_modules, linear_shape, load_model, resolve_targets, resolve_task
from ..runtime import resolve_device
from .aggregate import _aggregate, _architecture, _distribution
from .config import CONFIG_FILE, NEWTON_Z, RANK_GRID, AnalysisConfig, _safe, parse_device_map
from .scope import measure_scope

log = logging.getLogger(__name__)


def _scope_list(
    model: torch.nn.Module, targets: list[str], scopes: tuple[str, ...]
) -> list[tuple[str, str, list[str]]]:
    out: list[tuple[str, str, list[str]]] = []
    for kind in scopes:
        if kind == "module":
            out += [(t, "module", [t]) for t in targets]
        elif kind == "group":
            groups: dict[str, list[str]] = {}
            for t in targets:
                groups.setdefault(t.split(".")[-1], []).append(t)
            out += [(f"group:{g}", "group", mods) for g, mods in groups.items()]
        else:
            out.append(("joint", "joint", list(targets)))
    return out


def _data_fingerprint(data: str) -> dict[str, Any] | None:
    """Size and modification time of a data file (None for named datasets, which are fixed)."""
    p = Path(str(data))
    if not p.is_file():
        return None
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _config_hash(cfg: AnalysisConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _prepare_folder(cfg: AnalysisConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding another analysis or changed data; clear it on ``overwrite``; write the config."""
    cfg_path = out / CONFIG_FILE
    held = None if overwrite or not resume else stored_config(cfg_path, _normalise, "analysis", strict=False)
    old = None if held is None else {**held[0], "config": held[1]}
    units = out / "units"
    if old is not None and old["config"] != cfg.to_dict() and not any(units.glob("*.json")):
        # an earlier run that stopped before finishing any unit (a bad input, say): nothing to lose, start afresh
        log.info("%s: earlier analysis finished no unit; starting again with the new configuration", out)
        for f in list(units.glob("*")) if units.is_dir() else []:
            f.unlink()
        (out / "probe_head.pt").unlink(missing_ok=True)
        old = None
    if old is not None and old["config"] != cfg.to_dict():
        refuse_other_config(out, "an analysis", differing_fields(old["config"], cfg.to_dict()))
    ensure_new_or_resumable(out, CONFIG_FILE, resume=resume, overwrite=overwrite)
    if overwrite:
        for f in list((out / "units").glob("*")) if (out / "units").is_dir() else []:
            f.unlink()
        for name in ("probe_head.pt", "analysis.json", "analysis.npz"):
            (out / name).unlink(missing_ok=True)
    fingerprint = _data_fingerprint(cfg.data)
    if old is not None and old.get("data_fingerprint") is not None and old["data_fingerprint"] != fingerprint:
        raise HessrankError(
            f"{out}: the data file changed since this analysis started ({cfg.data}); pass --overwrite to start again"
        )
    write_config(
        cfg_path,
        "hessrank.analysis_config/1",
        cfg.to_dict(),
        hash=_config_hash(cfg),
        data_fingerprint=fingerprint,
        hessrank_version=__version__,
    )


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    return AnalysisConfig.from_dict(config).to_dict()


@dataclass
class _Setup:
    """The loaded pieces every analysis step uses."""

    cfg: AnalysisConfig
    out: Path
    ds: Any
    train: Any
    held_out: Any
    task: str
    lm: Any
    enc: Encoder
    loss_fn: Any
    point: dict[str, Any]
    targets: list[str]
    device: torch.device
    batch_sets: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    kfac_stats: dict[str, Any] | None = None
    dist: _dist.DistContext | None = None  #: the torchrun process group (None: one process)

    def batches(self, rep: int) -> list[dict[str, torch.Tensor]]:
        """The fixed HVP batches of repeat ``rep`` (disjoint slices of one seeded permutation)."""
        if rep not in self.batch_sets:
            c = self.cfg
            self.batch_sets[rep] = analysis_batches(self.train, self.enc, c.num_batches, c.batch_size, c.seed, rep)
        return self.batch_sets[rep]

    def stats(self, progress: bool = False) -> dict[str, Any]:
        """K-FAC statistics of the target modules on ``kfac_batches`` batches; the first ``num_batches`` of them
        are repeat 0's HVP batches (the same seeded permutation), so the analysis reuses its examples."""
        if self.kfac_stats is None:
            from ..engine.kfac import collect

            c = self.cfg
            n = min(c.kfac_batches, len(self.train) // c.batch_size)
            if n < c.kfac_groups:
                raise HessrankError(
                    f"{self.ds.source}: {len(self.train)} training examples are too few for {c.kfac_groups} K-FAC "
                    f"batch groups of batch size {c.batch_size}"
                )
            kb = analysis_batches(self.train, self.enc, n, c.batch_size, seed=c.seed)
            named = dict(self.lm.model.named_modules())
            mods = {t: named[t] for t in self.targets}
            self.kfac_stats = collect(self.lm.model, mods, kb, groups=c.kfac_groups, seed=c.seed, progress=progress)
        return self.kfac_stats


def _analysis_point(
    cfg: AnalysisConfig,
    out: Path,
    model: torch.nn.Module,
    train: Any,
    enc: Encoder,
    device: Any,
    ctx: _dist.DistContext | None = None,
):
    """Where the Hessian is taken: the pretrained model, or for seq-cls the body with a fitted (cached) head.

    Under torchrun rank 0 fits (or loads) the head and broadcasts it, so every rank holds the same weights."""
    point: dict[str, Any] = {"kind": "pretrained", "reason": "a causal LM on prompt->answer data needs no new head"}
    if enc.task != "seq-cls":
        return point
    from ..engine.probe import find_head, fit_head

    if ctx is not None and not ctx.is_main:
        head_name, head = find_head(model)
        ctx.broadcast_tensors_(list(head.state_dict().values()))
        return {"kind": "pretrained body + fitted head", "head": head_name}

    probe_path = out / "probe_head.pt"
    if probe_path.exists():
        state = torch.load(probe_path, map_location=device, weights_only=True)
        head_name, head = find_head(model)
        try:
            head.load_state_dict(state["head"])
        except RuntimeError:
            raise HessrankError(
                f"{probe_path}: the cached probe head does not fit this model's head; rerun with --overwrite"
            ) from None
        probe = state["probe"]
    else:
        n_probe = min(cfg.probe_examples, len(train))
        if n_probe < 2:
            raise HessrankError(f"{train.source}: too few training examples for the linear probe")
        pb = analysis_batches(
            train, enc, num_batches=max(1, n_probe // 32), batch_size=min(32, n_probe), seed=cfg.seed + 7919
        )
        probe = dataclasses.asdict(fit_head(model, pb))
        head_name, head = find_head(model)
        state = {"head": head.state_dict(), "probe": probe}
        atomic_write(probe_path, lambda f: torch.save(state, f), mode="wb")
    if ctx is not None:
        ctx.broadcast_tensors_(list(head.state_dict().values()))
    return {
        "kind": "pretrained body + fitted head",
        "reason": "a new classification head is fitted first (linear probe) so the Hessian reflects "
        "fine-tuning rather than a random head",
        "probe": probe,
        "head": head_name,
    }


def _setup(cfg: AnalysisConfig, out: Path, ctx: _dist.DistContext | None = None) -> _Setup:
    """Data, split, model, encoder, analysis point and target modules."""
    if cfg.device_map is not None and ctx is not None and ctx.world_size > 1:
        raise HessrankError(
            "device-map places one model over several devices; under torchrun each process holds its own copy "
            "on its own device: use one or the other"
        )
    device = _dist.rank_device(resolve_device(cfg.device), ctx)
    ds = load_dataset(cfg.data, **cfg.data_options)
    task = resolve_task(cfg.model, cfg.task)
    num_labels = resolve_num_labels(ds, task, cfg.num_labels)
    if task == "seq-cls":
        check_labels(ds, num_labels)
    train, held_out = split_dataset(ds, cfg.eval_fraction, seed=cfg.seed)
    device_map = parse_device_map(cfg.device_map) if cfg.device_map is not None else None
    lm = load_model(
        cfg.model, task, num_labels=num_labels, dtype=cfg.dtype, seed=cfg.seed, device=device, device_map=device_map
    )
    if device_map is not None:
        # batches go where the embeddings are; accelerate's hooks carry activations from layer to layer
        device = lm.model.get_input_embeddings().weight.device
    lm.model.eval()
    enc = Encoder(lm.tokenizer, task, cfg.max_length, dataset=train)
    check_loss_tokens(train, enc)
    targets = resolve_targets(lm.model, cfg.modules)  # before the probe: a bad pattern fails at once
    point = _analysis_point(cfg, out, lm.model, train, enc, device, ctx)
    return _Setup(cfg, out, ds, train, held_out, task, lm, enc, loss_fn_for(task), point, targets, device, dist=ctx)


def _run_kfac(su: _Setup, units_dir: Path, progress: bool) -> None:
    """The whole-module K-FAC rank curves (``units/kfac.json``; :mod:`hessrank.engine.kfac`)."""
    from ..engine.kfac import module_curves

    path = units_dir / "kfac.json"
    if path.exists():
        return
    t0 = time.perf_counter()
    stats = su.stats(progress)
    t1 = time.perf_counter()
    doc = module_curves(stats, NEWTON_Z, RANK_GRID)
    c = su.cfg
    doc.update(
        {
            "batches": min(c.kfac_batches, len(su.train) // c.batch_size),
            "groups": c.kfac_groups,
            "statistics_seconds": t1 - t0,
            "seconds": time.perf_counter() - t0,
        }
    )
    write_json(path, doc)


def _run_scopes(su: _Setup, scopes: list[tuple[str, str, list[str]]], units_dir: Path, progress: bool) -> None:
    """One unit file per (repeat, scope) as it finishes, so an interrupted run resumes where it stopped."""
    cfg = su.cfg
    ctx = su.dist
    todo = [(r, s) for r in range(cfg.repeats) for s in scopes]
    stems = [f"r{rep}__{_safe(sname)}" for rep, (sname, _, _) in todo]
    done = [(units_dir / f"{t}.json").exists() and (units_dir / f"{t}.npz").exists() for t in stems]
    if ctx is not None:
        done = ctx.broadcast_object(done)  # rank 0's files decide, on every rank
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="analysis", unit="scope")
    for (rep, (sname, kind, mods)), stem, finished in zip(todo, stems, done):
        jpath, npath = units_dir / f"{stem}.json", units_dir / f"{stem}.npz"
        if not finished:
            if bar is not None:
                bar.set_postfix_str(f"repeat {rep} {sname}")
            keep = True if cfg.keep_graph == "true" else False if cfg.keep_graph == "false" else "auto"
            op = HessianOperator(su.lm.model, su.loss_fn, su.batches(rep), params=mods, keep_graph=keep, dist=ctx)
            res, arrays = measure_scope(op, cfg, seed=cfg.seed + 1000 * rep, progress=False, kfac_stats=su.stats())
            op.release()
            _dist.check_replicated(ctx, f"{sname} (repeat {rep})", [res["eigenvalues"], res["matvecs"]])
            res.update({"scope": sname, "kind": kind, "repeat": rep, "modules": mods})
            if ctx is not None:  # the batches each rank's operator actually held
                res["batches_by_rank"] = {str(r): ids for r, ids in enumerate(ctx.all_gather_object(op.batch_ids))}
            if ctx is not None and not ctx.is_main:
                if bar is not None:
                    bar.update(1)
                continue
            write_npz(npath, arrays)
            write_json(jpath, res)  # written last: its presence marks the unit as done
            if not res["converged"]:
                log.warning(
                    "%s (repeat %d): the top-%d eigenvalues did not all converge in %d HVPs (tol %g); residuals "
                    "||Hv - lambda v|| %s, error bounds %s; raise --max-matvecs or loosen --tol",
                    sname,
                    rep,
                    len(res["eigenvalues"]),
                    res["lanczos_matvecs"],
                    cfg.tol,
                    ", ".join(f"{x:.3g}" for x in res["residuals"]),
                    ", ".join(f"{x:.3g}" for x in res["error_bounds"]),
                )
            log.info(
                "%s (repeat %d): lambda_max %.4g, %d HVPs, %.1fs",
                sname,
                rep,
                res["eigenvalues"][0],
                res["matvecs"],
                res["seconds"],
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _run_quantization(su: _Setup, units_dir: Path, progress: bool) -> None:
    """Quantization sensitivity on repeat 0's batches, measured on held-out batches (``units/quant.json``)."""
    from ..engine.quantization import measure_quantization

    cfg = su.cfg
    if not cfg.quant_formats or (units_dir / "quant.json").exists():
        return
    n_eval = min(cfg.quant_eval_batches, max(1, len(su.held_out) // cfg.batch_size))
    eval_b = analysis_batches(su.held_out, su.enc, n_eval, min(cfg.batch_size, len(su.held_out)), seed=cfg.seed)
    exact = cfg.quant_exact == "yes" or (cfg.quant_exact == "auto" and len(su.targets) * len(cfg.quant_formats) <= 120)
    op = HessianOperator(su.lm.model, su.loss_fn, su.batches(0), params=su.targets)
    t0 = time.perf_counter()
    qdoc, _ = measure_quantization(
        su.lm.model,
        su.loss_fn,
        su.task,
        op,
        eval_b,
        cfg.quant_formats,
        sign_probes=cfg.quant_sign_probes,
        exact=exact,
        seed=cfg.seed,
        rank_grid=RANK_GRID,
        progress=progress,
        factors=su.stats(),
        module_evals=cfg.quant_module_evals,
    )
    qdoc["hvps"] = op.num_matvecs
    qdoc["seconds"] = time.perf_counter() - t0
    op.release()
    write_json(units_dir / "quant.json", qdoc)


def _run_pilot(su: _Setup, units_dir: Path, progress: bool) -> None:
    """The pilot LoRA run and its measured truncations (``units/pilot.json``; :mod:`hessrank.analysis.pilot`)."""
    from . import pilot

    cfg = su.cfg
    path = units_dir / "pilot.json"
    if not cfg.pilot_steps or path.exists():
        return
    ps = cfg.pilot_settings()
    n_eval = min(ps.eval_batches, max(1, len(su.held_out) // ps.batch_size))
    eval_b = analysis_batches(su.held_out, su.enc, n_eval, min(ps.batch_size, len(su.held_out)), seed=cfg.seed + 1)
    head = []
    if su.task == "seq-cls":
        from ..engine.probe import find_head

        head = [find_head(su.lm.model)[0]]
    lin = linear_modules(su.lm.model)
    shapes = {t: linear_shape(lin[t]) for t in su.targets}
    items = [su.enc.encode(e) for e in su.train.examples]
    doc = pilot.run(
        su.lm.model,
        su.targets,
        head,
        su.task,
        su.loss_fn,
        items,
        su.enc.collate,
        eval_b,
        su.stats(),
        shapes,
        ps,
        1e-2,  # damping relative to the largest K-FAC curvature: the advisor's default z
        RANK_GRID,
        progress,
    )
    write_json(path, doc)


def analyze(
    cfg: AnalysisConfig, out: str | Path, resume: bool = True, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the analysis described by ``cfg`` into folder ``out``; returns the ``analysis.json`` document.

    Steps (each a unit file under ``out/units``, so a rerun resumes): K-FAC rank curves of every target module,
    the Lanczos/SLQ measurements of each scope and repeat, quantization sensitivity; then ``analysis.json``.
    """
    out = Path(out)
    # under torchrun every rank evaluates its share of the batches (hessrank.distributed); rank 0 writes
    return _dist.run_stage(
        out,
        "analyze",
        resolve_device(cfg.device),
        progress,
        lambda prog, ctx: _analyze(cfg, out, resume, overwrite, prog, ctx),
    )


def _analyze(
    cfg: AnalysisConfig,
    out: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    ctx: _dist.DistContext | None = None,
) -> dict[str, Any]:
    main = ctx is None or ctx.is_main
    if main:
        _prepare_folder(cfg, out, resume, overwrite)
    if ctx is not None:
        ctx.barrier()  # the folder is prepared (or rank 0 failed, and torchrun stops the group)
    started = time.time()
    su = _setup(cfg, out, ctx)
    lin = linear_modules(su.lm.model)
    module_info = {
        t: {
            "shape": list(linear_shape(lin[t])),
            "params": int(np.prod(linear_shape(lin[t]))),
            "group": t.split(".")[-1],
        }
        for t in su.targets
    }
    architecture = _architecture(su.lm.model, su.task, su.lm.info["num_parameters"])
    scopes = _scope_list(su.lm.model, su.targets, cfg.scopes)
    _check_k(cfg, scopes, module_info)
    units_dir = out / "units"
    if main:
        units_dir.mkdir(exist_ok=True)
        _run_kfac(su, units_dir, progress)
    _run_scopes(su, scopes, units_dir, progress)
    if ctx is not None:
        # quantization runs on rank 0 alone, on the full (unsharded) batches: its in-sample losses are means over
        # all of them; the other ranks wait here
        if main:
            _run_quantization(dataclasses.replace(su, dist=None), units_dir, progress)
        ctx.barrier()
    else:
        _run_quantization(su, units_dir, progress)
    if main:
        _run_pilot(su, units_dir, progress)  # rank 0 alone (a short training run; the others wait below)
    if ctx is not None:
        ctx.barrier()
    layout = _distribution(ctx, len(su.batches(0)))
    doc = None
    if main:
        doc = _aggregate(
            cfg, out, scopes, module_info, su.point, su.lm, su.ds, su.train, su.task, started, architecture, layout
        )
    return doc if ctx is None else ctx.broadcast_object(doc)


def _check_k(cfg: AnalysisConfig, scopes: list[tuple[str, str, list[str]]], module_info: dict) -> None:
    """Refuse --top-k / --negative-k that are not below a scope's dimension (Lanczos would return every
    eigenvalue, and the top-k subspace would be the whole space)."""
    for sname, _, mods in scopes:
        n = sum(module_info[m]["params"] for m in mods)
        for opt, k in (("top-k", cfg.top_k), ("negative-k", cfg.negative_k)):
            if k >= n:
                raise ScopeError(
                    f"--{opt} {k} is not below the dimension of scope '{sname}' ({n:,} parameters); "
                    f"choose --{opt} below {n:,} or add modules to the scope"
                )
