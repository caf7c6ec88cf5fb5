"""Analysis: scopes (module, group, joint), repeats for error bars, and ``analysis.json``.

For each *scope* — one target module, a group of modules sharing a PEFT name (every ``q_proj``), or all target
modules jointly in one operator — hessrank measures, on ``repeats`` independent sets of fixed batches:

* the top-k eigenvalues (Lanczos, ``which="LA"``) with residuals and convergence, and the most negative few
  (``which="SA"``), since the Hessian at a pretrained point is indefinite;
* the spectral density by SLQ and the trace by Hutch++;
* effective-dimension measures (:mod:`hessrank.engine.spectrum`);
* the gradient g and its projections gᵢ = gᵀvᵢ on the top eigenvectors;
* for the joint and group scopes, how each top eigenvector's mass ‖vᵢ|ₘ‖² splits across modules m;
* per module, the *damped Newton step restricted to the top-k subspace*, Δ(z) = −Σᵢ gᵢ/(λᵢ⁺ + z) vᵢ, reshaped to
  the module's (out × in) weight: its singular values, and the quadratic model's predicted loss change when Δ|ₘ
  is truncated to rank r, q_m(r) = Σᵢ gᵢ bᵢ(r) + ½ Σᵢ λᵢ bᵢ(r)², bᵢ(r) = ⟨vᵢ|ₘ, [Δ|ₘ]_r⟩ (the model restricted to
  the top-k subspace; Δ's truncation is projected back onto it). These are the raw material of the advisor's
  Newton-step rank and of the predicted loss-vs-rank curve.

Damping z is relative to the scope's λ_max: z = c·λ_max for c in ``NEWTON_Z``. λᵢ⁺ = max(λᵢ, 0).

Everything is written under the output folder: one unit file per (repeat, scope) under ``units/`` as it finishes
(atomic writes), so an interrupted run resumes where it stopped, then ``analysis.json`` (schema
``hessrank.analysis/1``, documented in ``docs/schemas.md``) and ``analysis.npz`` (arrays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
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
from ..engine.lanczos import BasisPlan, LanczosResult, SpectralDensity, default_ncv, lanczos, plan_basis, slq
from ..engine.lowrank import RANK_GRID  # the one grid: curves are measured on the ranks advice is given on
from ..engine.spectrum import effective_dimensions
from ..engine.tasks import loss_fn_for
from ..engine.trace import TraceResult, hutchpp
from ..errors import HessrankError, ScopeError
from ..io import atomic_write, ensure_new_or_resumable, read_json, read_npz, write_json, write_npz
from ..models import linear_modules, linear_shape, load_model, resolve_targets
from ..runtime import _versions, resolve_device

log = logging.getLogger(__name__)

SCHEMA = "hessrank.analysis/1"
SCOPES = ("module", "group", "joint")
NEWTON_Z: tuple[float, ...] = (1e-1, 1e-2, 1e-3)
CONFIG_FILE = "analysis_config.json"


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that determines an analysis. Two runs with equal configs give equal results (same seed)."""

    model: str
    data: str
    task: str | None = None
    modules: str = "q_proj,v_proj"
    scopes: tuple[str, ...] = ("joint",)
    top_k: int = 10
    negative_k: int = 2
    tol: float = 1e-3
    max_matvecs: int = 200
    slq_probes: int = 4
    slq_steps: int = 20
    trace_matvecs: int = 0
    batch_size: int = 8
    num_batches: int = 2
    max_length: int = 64
    repeats: int = 1
    seed: int = 0
    num_labels: int | None = None
    eval_fraction: float = 0.1
    probe_examples: int = 512
    device: str = "auto"
    #: accelerate placement for a model larger than one device: auto | balanced | balanced_low_0 | sequential,
    #: or a JSON file of {module: device}; None: the whole model on ``device`` (docs/scaling.md)
    device_map: str | None = None
    dtype: str = "float32"
    keep_graph: str = "auto"
    #: Krylov basis storage (hessrank.engine.lanczos.STORAGES); auto: from the memory estimate
    krylov_storage: str = "auto"
    quant_formats: tuple[str, ...] = ()
    quant_sign_probes: int = 4
    quant_exact: str = "no"
    quant_eval_batches: int = 8
    kfac_batches: int = 16
    kfac_groups: int = 4
    #: the pilot LoRA run (:mod:`hessrank.analysis.pilot`, opt-in): steps (0: none), rank, learning rate, batch,
    #: held-out batches
    pilot_steps: int = 0
    pilot_rank: int = 64
    pilot_lr: float = 1e-3
    pilot_batch_size: int | None = None  #: None: ``batch_size`` (a batch the user already knows fits)
    pilot_eval_batches: int = 8
    data_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.scopes if s not in SCOPES]
        if bad or not self.scopes:
            raise HessrankError(f"scope {bad or self.scopes} is not one of {', '.join(SCOPES)}")
        for name in ("top_k", "batch_size", "num_batches", "repeats", "max_length", "max_matvecs"):
            if getattr(self, name) < 1:
                raise HessrankError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("negative_k", "slq_probes", "trace_matvecs", "probe_examples"):
            if getattr(self, name) < 0:
                raise HessrankError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.slq_probes and self.slq_steps < 2:
            raise HessrankError(f"slq-steps must be at least 2, got {self.slq_steps}")
        if self.trace_matvecs and self.trace_matvecs < 6:
            raise HessrankError(f"trace-matvecs must be 0 or at least 6 (Hutch++), got {self.trace_matvecs}")
        if not 0 < self.tol < 1:
            raise HessrankError(f"tol must be in (0, 1), got {self.tol}")
        from ..engine.quantization import FORMATS

        bad_q = [f for f in self.quant_formats if f not in FORMATS]
        if bad_q:
            raise HessrankError(f"quantization format {bad_q[0]!r} is not one of {', '.join(FORMATS)}")
        from ..engine.lanczos import STORAGES

        if self.krylov_storage not in STORAGES:
            raise HessrankError(f"krylov-storage must be one of {', '.join(STORAGES)}, got {self.krylov_storage!r}")
        if self.device_map is not None:
            parse_device_map(self.device_map)  # a bad keyword or file fails before any work
        if self.quant_exact not in ("auto", "yes", "no"):
            raise HessrankError(f"quant-exact must be auto, yes or no, got {self.quant_exact!r}")
        if self.kfac_groups < 4 or self.kfac_groups % 2:
            raise HessrankError(f"kfac-groups must be an even number >= 4, got {self.kfac_groups}")
        if self.pilot_steps < 0:
            raise HessrankError(f"pilot-steps must be >= 0 (0: no pilot run), got {self.pilot_steps}")
        if self.pilot_steps:
            self.pilot_settings().check()
        if self.kfac_batches < self.kfac_groups:
            raise HessrankError(f"kfac-batches ({self.kfac_batches}) must be at least kfac-groups ({self.kfac_groups})")

    def pilot_settings(self) -> Any:
        from .pilot import PilotSettings

        return PilotSettings(
            steps=max(1, self.pilot_steps),
            rank=self.pilot_rank,
            lr=self.pilot_lr,
            batch_size=self.pilot_batch_size or self.batch_size,
            eval_batches=self.pilot_eval_batches,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-normalised (tuples become lists), so a config read back from disk compares equal."""
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisConfig:
        d = dict(d)
        d["scopes"] = tuple(d.get("scopes", ("joint",)))
        d["quant_formats"] = tuple(d.get("quant_formats", ()))
        opts = dict(d.get("data_options") or {})
        if isinstance(opts.get("label_names"), list):
            opts["label_names"] = tuple(opts["label_names"])
        d["data_options"] = opts
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise HessrankError(f"unknown analysis config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class _Timed:
    """Wraps an operator to time its matvecs."""

    def __init__(self, op: HessianOperator):
        self.op = op
        self.shape = op.shape
        self.n = op.n
        self.slices = op.slices
        self.device = op.device
        self.dtype = op.dtype
        self.seconds = 0.0
        self.count = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - t
        self.count += 1
        return out


# ----------------------------------------------------------------------------------------------------------
# Newton-step quantities
# ----------------------------------------------------------------------------------------------------------


def newton_module_quantities(
    eigenvalues: np.ndarray,
    projections: np.ndarray,
    vectors_by_module: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    z_family: tuple[float, ...] = NEWTON_Z,
    rank_grid: tuple[int, ...] = RANK_GRID,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per module and damping z: singular values of the restricted Newton step and its rank-r loss curve.

    ``vectors_by_module[m]`` is (k × out·in): the top-k eigenvectors restricted to module m.
    Returns JSON-ready summaries and arrays (singular values per module and z).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    g = np.asarray(projections, dtype=np.float64)
    lmax = max(float(lam.max()), 0.0) if len(lam) else 0.0
    out: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for c in z_family:
        zkey = f"{c:g}"
        z = c * lmax if lmax > 0 else c
        a = -g / (np.clip(lam, 0, None) + z)  # coordinates of the damped Newton step in the eigenbasis
        full = float(g @ a + 0.5 * np.sum(lam * a**2))
        per: dict[str, Any] = {}
        for m, Vm in vectors_by_module.items():
            o, i = shapes[m]
            Vm64 = Vm.double()
            step = (torch.from_numpy(a) @ Vm64).view(o, i)  # Δ restricted to module m
            U, S, Wh = torch.linalg.svd(step, full_matrices=False)
            # P[i, j] = u_jᵀ V_i|m w_j : coordinate of the j-th singular triplet along eigenvector i
            Vmat = Vm64.view(-1, o, i)
            P = torch.einsum("oj,koi,ji->kj", U, Vmat, Wh)
            s = S.numpy()
            cum_b = np.cumsum(P.numpy() * s[None, :], axis=1)  # b(r) for r = 1..rank
            rmax = len(s)
            ranks = [r for r in rank_grid if r < rmax] + [rmax]
            curve = []
            for r in ranks:
                b = cum_b[:, r - 1]
                curve.append(float(g @ b + 0.5 * np.sum(lam * b**2)))
            energy = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-300)
            erank = {f"{p:g}": min(rmax, int(np.searchsorted(energy, p - 1e-12) + 1)) for p in (0.5, 0.9, 0.99)}
            bfull = cum_b[:, -1]
            per[m] = {
                "energy_rank": erank,
                "step_norm": float(np.linalg.norm(s)),
                "predicted_change_module": float(g @ bfull + 0.5 * np.sum(lam * bfull**2)),
                # coords[j][i] = b_i(r_j): the truncated step's coordinate along eigenvector i, so modules sharing a
                # scope can be combined in the joint quadratic model, cross terms included
                "curve": {
                    "ranks": ranks,
                    "predicted_change": curve,
                    "coords": [cum_b[:, r - 1].tolist() for r in ranks],
                },
            }
            arrays[f"newton/{zkey}/{m}/singular_values"] = s.astype(np.float32)
        out[zkey] = {"z": z, "predicted_change_full": full, "per_module": per}
    return out, arrays


# ----------------------------------------------------------------------------------------------------------
# One scope
# ----------------------------------------------------------------------------------------------------------


def kfac_exact_check(
    op: Any, grad: torch.Tensor, stats: dict[str, Any], ranks: tuple[int, ...] = (1, 8), z: float = 1e-2
) -> list[dict[str, Any]]:
    """The exact quadratic model along the K-FAC rank-r steps of the scope's modules (one HVP per rank).

    D = (Δ_m(r))_m with Δ_m(r) the K-FAC-optimal rank-r update of module m (:func:`hessrank.engine.kfac.rank_r_step`,
    damping z relative to the largest K-FAC eigenvalue). Exact: gᵀD and DᵀHD (an HVP); K-FAC: DᵀKD =
    Σ_m tr(Δ_mᵀ G_m Δ_m A_m). The exact model's best decrease along D is ½(gᵀD)²/DᵀHD (when DᵀHD > 0): a
    rank-r update's decrease certified by the exact Hessian, and DᵀHD/DᵀKD is the K-FAC scale along it.
    """
    from ..engine.kfac import Eig, rank_r_step

    mods = {s.module: s for s in op.slices if len(s.shape) == 2 and s.module in stats}
    if not mods:
        return []
    eigs = {m: Eig.of(stats[m]) for m in mods}
    ref = max(Eig.of(st).lambda_max for st in stats.values())
    out = []
    for r in ranks:
        D = torch.zeros(op.n, dtype=torch.float64)
        dkd = 0.0
        for m, sl in mods.items():
            st = stats[m]
            step = rank_r_step(eigs[m], sum(st.grads) / len(st.grads), z * ref, min(r, min(st.shape)))
            dkd += float(((st.G @ step) * (step @ st.A)).sum())
            flat = step if tuple(sl.shape) == step.shape else step.T  # Conv1D stores (in, out)
            D[sl.start : sl.stop] = flat.reshape(-1)
        Dv = D.to(device=op.device, dtype=op.dtype)
        dhd = float(Dv.double() @ op.matvec(Dv).double())
        gd = float(grad.double() @ Dv.double())
        out.append(
            {
                "rank": r,
                "g_dot_d": gd,
                "dHd": dhd,
                "dKd": dkd,
                "exact_decrease": 0.5 * gd * gd / dhd if dhd > 0 and gd < 0 else None,
                "scale_along_step": dhd / dkd if dkd > 0 else None,
            }
        )
    return out


def _plan_krylov_basis(op: HessianOperator, cfg: AnalysisConfig, k: int) -> BasisPlan:
    """Where the top-k run's Krylov basis will live, logged before the run (what it takes and where)."""
    basis = plan_basis(
        op.n,
        min(op.n, default_ncv(op.n, k)) + 1,
        op.device,
        cfg.krylov_storage,
        itemsize=8 if op.dtype == torch.float64 else 4,
    )
    log.info("%s", basis.describe())  # before the run: what the basis will take and where it lives
    return basis


def _top_eigenpairs(
    timed: _Timed, cfg: AnalysisConfig, k: int, seed: int, storage: str, progress: bool
) -> LanczosResult:
    """The top-k eigenpairs (Lanczos, ``which="LA"``), eigenvectors included."""
    return lanczos(
        timed,
        k=k,
        which="LA",
        tol=cfg.tol,
        max_matvecs=cfg.max_matvecs,
        seed=seed,
        return_eigenvectors=True,
        progress=progress,
        storage=storage,
    )


def _negative_eigenvalues(
    timed: _Timed, cfg: AnalysisConfig, n: int, seed: int, storage: str, progress: bool
) -> LanczosResult | None:
    """The most negative ``cfg.negative_k`` eigenvalues (Lanczos, ``which="SA"``), or None when none are asked."""
    if not cfg.negative_k:
        return None
    # the negative end is reported, not used for advice: a looser tolerance and a small budget
    return lanczos(
        timed,
        k=min(cfg.negative_k, n),
        which="SA",
        tol=max(cfg.tol, 1e-2),
        max_matvecs=min(cfg.max_matvecs, 60),
        seed=seed + 1,
        progress=progress,
        storage=storage,
    )


def _density_and_trace(
    timed: _Timed, cfg: AnalysisConfig, seed: int, storage: str
) -> tuple[SpectralDensity | None, TraceResult | None]:
    """The SLQ spectral density and the Hutch++ trace, each None when its budget is 0."""
    dens = (
        slq(timed, num_probes=cfg.slq_probes, num_steps=cfg.slq_steps, seed=seed + 2, storage=storage)
        if cfg.slq_probes
        else None
    )
    tr = hutchpp(timed, cfg.trace_matvecs, seed=seed + 3) if cfg.trace_matvecs else None
    return dens, tr


def _split_by_module(
    op: HessianOperator, V: torch.Tensor
) -> tuple[list[str], dict[str, np.ndarray], dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Modules in order, each eigenvector's mass ‖vᵢ|ₘ‖² per module, and the 2-D weights' rows of V and shapes."""
    mod_of_slice = [s.module for s in op.slices]
    modules = list(dict.fromkeys(mod_of_slice))
    split = {}
    vectors_by_module: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for s in op.slices:
        Vm = V[:, s.start : s.stop].detach().cpu()
        mass = (Vm.double() ** 2).sum(dim=1).numpy()
        split[s.module] = split.get(s.module, 0) + mass
        if len(s.shape) == 2 and s.name.endswith("weight"):
            vectors_by_module[s.module] = Vm
            shapes[s.module] = (int(s.shape[0]), int(s.shape[1]))
    return modules, split, vectors_by_module, shapes


def _kfac_fields(
    timed: _Timed,
    grad: torch.Tensor,
    kfac_stats: dict[str, Any] | None,
    vectors_by_module: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """``kfac_rayleigh`` and ``kfac_exact_check`` when K-FAC statistics were collected, else nothing."""
    if kfac_stats is None:
        return {}
    from ..engine.kfac import rayleigh_quotients

    return {
        "kfac_rayleigh": rayleigh_quotients(vectors_by_module, kfac_stats, shapes),
        "kfac_exact_check": kfac_exact_check(timed, grad, kfac_stats),
    }


def _trace_fields(tr: TraceResult | None, dens: SpectralDensity | None) -> dict[str, Any]:
    """The trace, its standard error and the method: Hutch++ when it ran, else SLQ, else None."""
    return {
        "trace": tr.estimate if tr is not None else (dens.trace_of(lambda x: x)[0] if dens is not None else None),
        "trace_se": tr.std_error if tr is not None else (dens.trace_of(lambda x: x)[1] if dens is not None else None),
        "trace_method": "hutch++" if tr is not None else ("slq" if dens is not None else None),
    }


def measure_scope(
    op: HessianOperator,
    cfg: AnalysisConfig,
    seed: int,
    progress: bool = False,
    kfac_stats: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All measurements of one operator; returns JSON-ready results and arrays.

    With ``kfac_stats`` (:func:`hessrank.engine.kfac.collect`) it also records the K-FAC Rayleigh quotients of the top
    eigenvectors (``kfac_rayleigh``, the calibration of :mod:`hessrank.engine.kfac`) and :func:`kfac_exact_check`.
    """
    timed = _Timed(op)
    t0 = time.perf_counter()
    tg = time.perf_counter()
    grad = op.gradient()
    grad_seconds = time.perf_counter() - tg
    loss = op.loss()
    k = min(cfg.top_k, op.n)
    basis = _plan_krylov_basis(op, cfg, k)
    top = _top_eigenpairs(timed, cfg, k, seed, basis.storage, progress)
    assert top.eigenvectors is not None
    V = top.eigenvectors.T  # k × n (rows contiguous)
    proj = (V.double() @ grad.double()).cpu().numpy()
    neg = _negative_eigenvalues(timed, cfg, op.n, seed, basis.storage, progress)
    dens, tr = _density_and_trace(timed, cfg, seed, basis.storage)
    eff = effective_dimensions(top.eigenvalues, dens)

    modules, split, vectors_by_module, shapes = _split_by_module(op, V)
    newton, arrays = newton_module_quantities(top.eigenvalues, proj, vectors_by_module, shapes)
    kfac_part = _kfac_fields(timed, grad, kfac_stats, vectors_by_module, shapes)
    lam_pos = np.clip(top.eigenvalues, 0, None)
    curvature_share = {m: float((lam_pos * split[m]).sum() / max(lam_pos.sum(), 1e-300)) for m in modules}

    res: dict[str, Any] = {
        "num_params": op.n,
        "loss": loss,
        "grad_norm": float(grad.double().norm()),
        "eigenvalues": top.eigenvalues.tolist(),
        "residuals": top.residuals.tolist(),
        "error_bounds": top.error_bounds.tolist(),
        "converged": top.converged,
        "lanczos_matvecs": top.num_matvecs,
        "grad_projections": proj.tolist(),
        "negative_eigenvalues": neg.eigenvalues.tolist() if neg is not None else [],
        "negative_converged": neg.converged if neg is not None else None,
        **_trace_fields(tr, dens),
        "effective_dimension": eff.to_dict(),
        "module_mass": {m: split[m].tolist() for m in modules},
        "module_curvature_share": curvature_share,
        "newton": newton,
        **kfac_part,
        "krylov_basis": {"storage": basis.storage, "vectors": basis.vectors, "bytes": basis.bytes},
        "matvecs": timed.count,
        "hvp_seconds": timed.seconds / max(timed.count, 1),
        "graph_seconds": grad_seconds,
        "seconds": time.perf_counter() - t0,
    }
    if dens is not None:
        arrays["slq/nodes"] = dens.nodes
        arrays["slq/weights"] = dens.weights
    arrays["eigenvalues"] = top.eigenvalues
    return res, arrays


# ----------------------------------------------------------------------------------------------------------
# The whole analysis
# ----------------------------------------------------------------------------------------------------------


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
    old = read_json(cfg_path) if cfg_path.exists() and resume and not overwrite else None
    if old is not None:
        # a folder written before a new config field compares at that field's default
        with contextlib.suppress(HessrankError, TypeError):
            old["config"] = AnalysisConfig.from_dict(old.get("config") or {}).to_dict()
    units = out / "units"
    if old is not None and old.get("config") != cfg.to_dict() and not any(units.glob("*.json")):
        # an earlier run that stopped before finishing any unit (a bad input, say): nothing to lose, start afresh
        log.info("%s: earlier analysis finished no unit; starting again with the new configuration", out)
        for f in list(units.glob("*")) if units.is_dir() else []:
            f.unlink()
        (out / "probe_head.pt").unlink(missing_ok=True)
        old = None
    if old is not None and old.get("config") != cfg.to_dict():
        diff = sorted(k for k in cfg.to_dict() if old.get("config", {}).get(k) != cfg.to_dict()[k])
        raise HessrankError(
            f"{out}: holds an analysis with a different configuration (differs in: {', '.join(diff)}); "
            "pass --overwrite to replace it or choose another --out"
        )
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
    write_json(
        cfg_path,
        {
            "schema": "hessrank.analysis_config/1",
            "config": cfg.to_dict(),
            "hash": _config_hash(cfg),
            "data_fingerprint": fingerprint,
            "hessrank_version": __version__,
        },
    )


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


DEVICE_MAP_KEYWORDS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str) -> str | dict[str, Any]:
    """``--device-map``: one of accelerate's placement keywords, or a JSON file holding {module name: device}
    (devices as accelerate accepts them: ``0``, ``"cuda:1"``, ``"cpu"``)."""
    if value in DEVICE_MAP_KEYWORDS:
        return value
    path = Path(value)
    if not path.is_file():
        raise HessrankError(
            f"device-map {value!r} is neither one of {', '.join(DEVICE_MAP_KEYWORDS)} nor a JSON file of "
            "{module: device}"
        )
    try:
        placed = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HessrankError(f"device-map file {path}: cannot read it as JSON ({e})") from None
    if not isinstance(placed, dict) or not placed or not all(isinstance(v, (int, str)) for v in placed.values()):
        raise HessrankError(f"device-map file {path}: expected a non-empty JSON object {{module: device}}")
    return placed


def _setup(cfg: AnalysisConfig, out: Path, ctx: _dist.DistContext | None = None) -> _Setup:
    """Data, split, model, encoder, analysis point and target modules."""
    from ..models import BUNDLED_MODELS

    if cfg.device_map is not None and ctx is not None and ctx.world_size > 1:
        raise HessrankError(
            "device-map places one model over several devices; under torchrun each process holds its own copy "
            "on its own device: use one or the other"
        )
    device = _dist.rank_device(resolve_device(cfg.device), ctx)
    ds = load_dataset(cfg.data, **cfg.data_options)
    task = cfg.task or (BUNDLED_MODELS[cfg.model].task if cfg.model in BUNDLED_MODELS else "causal-lm")
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
    factors = {m: (st.A, st.G) for m, st in su.stats().items()}
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
        factors=factors,
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


def _distribution(ctx: _dist.DistContext | None, num_batches: int) -> dict[str, Any]:
    """``analysis.json``'s ``distributed``: the process group and which analysis batches each rank evaluated."""
    world = 1 if ctx is None else ctx.world_size
    return {
        "world_size": world,
        "backend": None if ctx is None else ctx.backend,
        "batches_by_rank": _dist.assignment(num_batches, world),
    }


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


def _architecture(model: torch.nn.Module, task: str, num_parameters: int) -> dict[str, Any]:
    """What the memory forecast needs: linear layers bitsandbytes would quantize, sizes, head."""
    from ..engine.quantization import bnb_quantized_linears

    cfg = model.config
    lin = linear_modules(model)
    head_params = 0
    if task == "seq-cls":
        from ..engine.probe import find_head

        _, head = find_head(model)
        head_params = sum(p.numel() for p in head.parameters())
    return {
        "num_parameters": num_parameters,
        "linear_shapes": {n: list(linear_shape(lin[n])) for n in bnb_quantized_linears(model)},
        "hidden_size": int(getattr(cfg, "hidden_size", 0)),
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0)),
        "num_heads": int(getattr(cfg, "num_attention_heads", 1)),
        "vocab_size": int(cfg.vocab_size) if task == "causal-lm" else None,
        "head_params": int(head_params),
    }


def _mean_std(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    width = min(len(r) for r in rows)
    a = np.array([r[:width] for r in rows], dtype=np.float64)
    std = a.std(axis=0, ddof=1) if len(rows) > 1 else np.full(width, np.nan)
    return a.mean(axis=0).tolist(), std.tolist()


def _read_repeats(units_dir: Path, sname: str, repeats: int, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The unit documents of one scope, one per repeat; their arrays go into ``arrays`` as ``scope/rN/key``."""
    reps = []
    for rep in range(repeats):
        stem = f"r{rep}__{_safe(sname)}"
        reps.append(read_json(units_dir / f"{stem}.json"))
        for k, v in read_npz(units_dir / f"{stem}.npz").items():
            arrays[f"{sname}/r{rep}/{k}"] = v
    return reps


def _neff_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over repeats of each effective-dimension measure the first repeat has."""
    neff = {}
    for fam in ("n_eff_relative_topk", "n_eff_absolute_topk", "n_eff_relative_slq", "n_eff_absolute_slq"):
        if reps[0]["effective_dimension"].get(fam) is None:
            continue
        keys = reps[0]["effective_dimension"][fam].keys()
        neff[fam] = {
            key: {
                "mean": float(np.mean([r["effective_dimension"][fam][key] for r in reps])),
                "std": float(np.std([r["effective_dimension"][fam][key] for r in reps], ddof=1))
                if len(reps) > 1
                else None,
            }
            for key in keys
        }
    return neff


def _scope_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One scope's summary over its repeats: eigenvalue mean and std, λ_max, n_eff, convergence, size."""
    ev_mean, ev_std = _mean_std([r["eigenvalues"] for r in reps])
    neff = _neff_summary(reps)
    return {
        "eigenvalues_mean": ev_mean,
        "eigenvalues_std": ev_std,
        "lambda_max_mean": ev_mean[0],
        "n_eff": neff,
        "converged": all(r["converged"] for r in reps),
        "num_params": reps[0]["num_params"],
    }


def _model_doc(cfg: AnalysisConfig, lm: Any, task: str) -> dict[str, Any]:
    """The ``model`` section: name, class, local path, parameter count and task."""
    return {
        "name": cfg.model,
        "class": type(lm.model).__name__,
        "path": str(lm.path),
        "num_parameters": lm.info["num_parameters"],
        "task": task,
        **({"device_map": lm.info["device_map"]} if "device_map" in lm.info else {}),
    }


def _data_doc(cfg: AnalysisConfig, ds: Any, train: Any) -> dict[str, Any]:
    """The ``data`` section: source, kind, sizes, labels, template and examples per repeat."""
    return {
        "source": ds.source,
        "kind": ds.kind,
        "num_examples": len(ds),
        "train_examples": len(train),
        "label_names": ds.label_names,
        "template": ds.template,
        "analysis_examples_per_repeat": cfg.num_batches * cfg.batch_size,
    }


def _cost_doc(
    total_hvp: int,
    hvp_s: list[float],
    grad_s: list[float],
    started: float,
    unit_seconds: float,
    quant_doc: dict[str, Any] | None,
    kfac_doc: dict[str, Any] | None,
    pilot_doc: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``cost`` section: HVPs, mean HVP and graph times, and the seconds of this run and of the work units."""
    return {
        "hvp_total": total_hvp,
        "hvp_seconds_mean": float(np.mean(hvp_s)) if hvp_s else None,
        "graph_seconds_mean": float(np.mean(grad_s)) if grad_s else None,
        "seconds_this_run": time.time() - started,
        # compute in the work units (scopes and quantization), resumed ones included; model loading, the probe
        # and the first gradient graph are not in it
        "seconds_units": unit_seconds
        + float(quant_doc.get("seconds", 0.0) if quant_doc else 0.0)
        + float(kfac_doc.get("seconds", 0.0) if kfac_doc else 0.0)
        + float(pilot_doc.get("seconds", 0.0) if pilot_doc else 0.0),
    }


def _aggregate(
    cfg: AnalysisConfig,
    out: Path,
    scopes: list[tuple[str, str, list[str]]],
    module_info: dict,
    point: dict,
    lm: Any,
    ds: Any,
    train: Any,
    task: str,
    started: float,
    architecture: dict[str, Any],
    distribution: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the unit files into ``analysis.json`` and ``analysis.npz`` (written) and return the document."""
    units_dir = out / "units"
    scope_docs = []
    arrays: dict[str, np.ndarray] = {}
    total_hvp = 0
    unit_seconds = 0.0
    hvp_s: list[float] = []
    grad_s: list[float] = []
    for sname, kind, mods in scopes:
        reps = _read_repeats(units_dir, sname, cfg.repeats, arrays)
        total_hvp += sum(r["matvecs"] for r in reps)
        unit_seconds += sum(float(r["seconds"]) for r in reps)
        hvp_s += [r["hvp_seconds"] for r in reps]
        grad_s += [r["graph_seconds"] for r in reps]
        summary = _scope_summary(reps)
        scope_docs.append({"name": sname, "kind": kind, "modules": mods, "summary": summary, "repeats": reps})
    quant_doc = read_json(units_dir / "quant.json") if (units_dir / "quant.json").exists() else None
    kfac_doc = read_json(units_dir / "kfac.json") if (units_dir / "kfac.json").exists() else None
    pilot_doc = read_json(units_dir / "pilot.json") if (units_dir / "pilot.json").exists() else None
    if kfac_doc is not None:
        kfac_doc["calibration"] = _kfac_calibration(scope_docs, kfac_doc)
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "config": cfg.to_dict(),
        "model": _model_doc(cfg, lm, task),
        "data": _data_doc(cfg, ds, train),
        "analysis_point": point,
        "modules": module_info,
        "architecture": architecture,
        "newton_z": list(NEWTON_Z),
        "rank_grid": list(RANK_GRID),
        "scopes": scope_docs,
        "kfac": kfac_doc,
        "pilot": pilot_doc,
        "quantization": quant_doc,
        "cost": _cost_doc(total_hvp, hvp_s, grad_s, started, unit_seconds, quant_doc, kfac_doc, pilot_doc),
        "arrays": "analysis.npz",
        "distributed": distribution,
    }
    write_npz(out / "analysis.npz", arrays)
    write_json(out / "analysis.json", doc)
    return doc


def _kfac_calibration(scope_docs: list[dict[str, Any]], kfac_doc: dict[str, Any]) -> dict[str, Any]:
    """Per scope (repeat 0): the K-FAC scale c fitted on the top-k Lanczos pairs, and the SLQ trace check.

    c = Σλᵢ⁺ρᵢ/Σρᵢ² (:func:`hessrank.engine.kfac.calibration`); trace_ratio = tr(H)_SLQ / (c·Σ_m tr(A_m)tr(G_m)).
    """
    from ..engine.kfac import calibration

    out = {}
    for sd in scope_docs:
        r0 = sd["repeats"][0]
        rho = r0.get("kfac_rayleigh") or []
        if not rho:
            continue
        cal = calibration(r0["eigenvalues"], rho)
        k_trace = sum(kfac_doc["factors"][m]["trace"] for m in sd["modules"] if m in kfac_doc["factors"])
        tr = r0.get("trace")
        cal["trace_ratio"] = tr / (cal["scale"] * k_trace) if tr and cal["scale"] and k_trace > 0 else None
        cal["exact_check"] = r0.get("kfac_exact_check")
        out[sd["name"]] = cal
    return out


def load_analysis(path: str | Path) -> dict[str, Any]:
    """Read ``analysis.json`` (a folder or the file) and check its schema."""
    p = Path(path)
    if not p.exists():
        raise HessrankError(f"{p}: no such analysis folder or file (run hessrank analyze --out {p} first)")
    if p.is_dir():
        p = p / "analysis.json"
    return read_json(p, schema=SCHEMA)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A console summary of an analysis document."""
    lines = [
        f"model {doc['model']['name']} ({doc['model']['class']}, task {doc['model']['task']}); "
        f"analysis point: {doc['analysis_point']['kind']}",
        f"data {doc['data']['source']}: {doc['data']['analysis_examples_per_repeat']} examples per repeat, "
        f"{doc['config']['repeats']} repeat(s)",
        "",
        f"{'scope':<44}{'params':>11}{'lambda_max':>13}{'lambda_k':>11}{'N_eff(1e-2)':>13}{'min neg':>11}"
        f"{'HVPs':>6}{'conv':>6}",
    ]
    for s in doc["scopes"]:
        r0 = s["repeats"][0]
        sm = s["summary"]
        ev = sm["eigenvalues_mean"]
        ne = sm["n_eff"].get("n_eff_relative_slq") or sm["n_eff"]["n_eff_relative_topk"]
        ne2 = ne.get("0.01", {})
        neff = f"{ne2.get('mean', float('nan')):.1f}"
        if ne2.get("std") is not None:
            neff += f"±{ne2['std']:.1f}"
        neg = min(r0["negative_eigenvalues"]) if r0["negative_eigenvalues"] else float("nan")
        lines.append(
            f"{s['name'][:43]:<44}{sm['num_params']:>11,}{ev[0]:>13.4g}{ev[-1]:>11.3g}{neff:>13}{neg:>11.3g}"
            f"{sum(r['matvecs'] for r in s['repeats']):>6}{'yes' if sm['converged'] else 'no':>6}"
        )
    c = doc["cost"]
    if c.get("hvp_seconds_mean") is not None:
        lines.append("")
        lines.append(
            f"{c['hvp_total']} HVPs, {c['hvp_seconds_mean']:.3f} s per HVP; building the gradient graphs took "
            f"{c['graph_seconds_mean']:.3f} s per scope"
        )
    return lines
