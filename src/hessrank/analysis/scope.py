"""Measuring one scope: its operator's spectrum, density, trace, and the Newton-step quantities.

A *scope* is one target module, a group of modules sharing a PEFT name (every ``q_proj``), or all target modules
jointly in one operator. On one set of fixed batches :func:`measure_scope` measures:

* the top-k eigenvalues (Lanczos, ``which="LA"``) with residuals and convergence, and the most negative few
  (``which="SA"``), since the Hessian at a pretrained point is indefinite;
* the spectral density by SLQ (its first probe is the top-k Lanczos run's first steps, no extra HVP) and the trace
  by Hutch++;
* effective-dimension measures (:mod:`hessrank.engine.spectrum`);
* the gradient g and its projections gᵢ = gᵀvᵢ on the top eigenvectors;
* for the joint and group scopes, how each top eigenvector's mass ‖vᵢ|ₘ‖² splits across modules m;
* per module, the *damped Newton step restricted to the top-k subspace*, Δ(z) = −Σᵢ gᵢ/(λᵢ⁺ + z) vᵢ, reshaped to
  the module's (out × in) weight: its singular values, and the quadratic model's predicted loss change when Δ|ₘ
  is truncated to rank r, q_m(r) = Σᵢ gᵢ bᵢ(r) + ½ Σᵢ λᵢ bᵢ(r)², bᵢ(r) = ⟨vᵢ|ₘ, [Δ|ₘ]_r⟩ (the model restricted to
  the top-k subspace; Δ's truncation is projected back onto it). These are the raw material of the advisor's
  Newton-step rank and of the predicted loss-vs-rank curve (:func:`newton_module_quantities`).

Damping z is relative to the scope's λ_max: z = c·λ_max for c in ``NEWTON_Z``. λᵢ⁺ = max(λᵢ, 0).
The Krylov basis is planned (and logged) before the top-k run (:func:`_plan_krylov_basis`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ..engine.curvature import HessianOperator
from ..engine.lanczos import BasisPlan, LanczosResult, SpectralDensity, default_ncv, lanczos, plan_basis, slq
from ..engine.spectrum import effective_dimensions
from ..engine.trace import TraceResult, hutchpp
from .config import NEWTON_Z, RANK_GRID, AnalysisConfig

# the name the console lines of the analysis have always carried (``INFO hessrank.analysis.run: ...``)
log = logging.getLogger("hessrank.analysis.run")


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
            # in the eigenvectors' own precision (float32 at least): a float32 Lanczos basis gains nothing from a
            # float64 SVD, which on a 37-module MiniLM scope cost 2x as much; sums below in float64
            Vw = Vm if Vm.dtype in (torch.float32, torch.float64) else Vm.float()
            step = (torch.from_numpy(a).to(Vw.dtype) @ Vw).view(o, i)  # Δ restricted to module m
            U, S, Wh = torch.linalg.svd(step, full_matrices=False)
            # P[i, j] = u_jᵀ V_i|m w_j : coordinate of the j-th singular triplet along eigenvector i
            Vmat = Vw.view(-1, o, i)
            P = torch.einsum("oj,koi,ji->kj", U, Vmat, Wh)
            s = S.double().numpy()
            cum_b = np.cumsum(P.double().numpy() * s[None, :], axis=1)  # b(r) for r = 1..rank
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


def kfac_exact_check(
    op: Any, grad: torch.Tensor, stats: dict[str, Any], ranks: tuple[int, ...] = (1, 8), z: float = 1e-2
) -> list[dict[str, Any]]:
    """The exact quadratic model along the K-FAC rank-r steps of the scope's modules (one HVP per rank).

    D = (Δ_m(r))_m with Δ_m(r) the K-FAC-optimal rank-r update of module m (:func:`hessrank.engine.kfac.rank_r_step`,
    damping z relative to the largest K-FAC eigenvalue). Exact: gᵀD and DᵀHD (an HVP); K-FAC: DᵀKD =
    Σ_m tr(Δ_mᵀ G_m Δ_m A_m). The exact model's best decrease along D is ½(gᵀD)²/DᵀHD (when DᵀHD > 0): a
    rank-r update's decrease certified by the exact Hessian, and DᵀHD/DᵀKD is the K-FAC scale along it.
    """
    from ..engine.kfac import rank_r_steps

    mods = {s.module: s for s in op.slices if len(s.shape) == 2 and s.module in stats}
    if not mods:
        return []
    ref = max(st.eig.lambda_max for st in stats.values())
    # every module's steps for all ranks from one decomposition; DᵀKD's products in the factors' precision
    steps: dict[str, dict[int, torch.Tensor]] = {}
    dkds: dict[str, dict[int, float]] = {}
    for m in mods:
        st = stats[m]
        rs = {r: min(r, min(st.shape)) for r in ranks}
        by = rank_r_steps(st.eig, sum(st.grads) / len(st.grads), z * ref, sorted(set(rs.values())), st.dtype)
        steps[m] = {r: by[rs[r]].to(st.dtype) for r in ranks}
        G, A = st.G.to(st.dtype), st.A.to(st.dtype)
        dkds[m] = {}
        for r, step in steps[m].items():
            dkds[m][r] = float(((G @ step) * (step @ A)).double().sum())
    out = []
    for r in ranks:
        D = torch.zeros(op.n, dtype=torch.float64)
        dkd = 0.0
        for m, sl in mods.items():
            step = steps[m][r]
            dkd += dkds[m][r]
            flat = step if tuple(sl.shape) == step.shape else step.T  # Conv1D stores (in, out)
            D[sl.start : sl.stop] = flat.reshape(-1).double()
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
    """The top-k eigenpairs (Lanczos, ``which="LA"``), eigenvectors included; the first ``slq_steps`` steps' Lanczos
    matrix is kept as the density's first probe (no extra HVP)."""
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
        keep_leading=min(cfg.slq_steps, timed.n) if cfg.slq_probes else 0,
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
    timed: _Timed, cfg: AnalysisConfig, seed: int, storage: str, leading: np.ndarray | None = None
) -> tuple[SpectralDensity | None, TraceResult | None]:
    """The SLQ spectral density (its first probe from the top-k run's ``leading`` Lanczos matrix when there is one)
    and the Hutch++ trace, each None when its budget is 0."""
    dens = (
        slq(
            timed,
            num_probes=cfg.slq_probes,
            num_steps=cfg.slq_steps,
            seed=seed + 2,
            storage=storage,
            leading=leading,
        )
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
    exact_check: bool,
) -> dict[str, Any]:
    """``kfac_rayleigh`` when K-FAC statistics were collected, and ``kfac_exact_check`` (null unless asked for:
    two HVPs, a diagnostic the advice does not use)."""
    if kfac_stats is None:
        return {}
    from ..engine.kfac import rayleigh_quotients

    return {
        "kfac_rayleigh": rayleigh_quotients(vectors_by_module, kfac_stats, shapes),
        "kfac_exact_check": kfac_exact_check(timed, grad, kfac_stats) if exact_check else None,
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
    eigenvectors (``kfac_rayleigh``, the calibration of :mod:`hessrank.engine.kfac`) and, with
    ``cfg.kfac_exact_check``, :func:`kfac_exact_check`.
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
    dens, tr = _density_and_trace(timed, cfg, seed, basis.storage, top.leading_tridiagonal)
    eff = effective_dimensions(top.eigenvalues, dens)

    modules, split, vectors_by_module, shapes = _split_by_module(op, V)
    newton, arrays = newton_module_quantities(top.eigenvalues, proj, vectors_by_module, shapes)
    kfac_part = _kfac_fields(timed, grad, kfac_stats, vectors_by_module, shapes, cfg.kfac_exact_check)
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
        "slq_probes_from_lanczos": dens.shared_probes if dens is not None else 0,
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
