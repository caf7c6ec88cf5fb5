"""Effective-dimension measures of a Hessian spectrum (numbers in, numbers out; no torch models).

Negative eigenvalues (the Hessian at a pretrained point is indefinite) carry no "curvature to fit" and are
clipped to zero in every measure below: λ⁺ = max(λ, 0).

* **N_eff(z) = Σᵢ λᵢ⁺ / (λᵢ⁺ + z)** — MacKay's effective number of well-determined parameters (MacKay, *Bayesian
  interpolation*, Neural Computation 4(3), 1992, eq. 4.11, with z the prior precision), used as a measure of
  model dimension by Maddox, Benton & Wilson, *Rethinking parameter counting in deep models: effective
  dimensionality revisited* (arXiv:2003.02139, 2020, eq. 2). Directions with curvature well above z count ~1,
  those well below count ~0. We report it for a documented family of z:
  *relative* z = c · λ_max for c ∈ {1e-1, 1e-2, 1e-3} (scale-free: how many directions are within a factor 1/c
  of the sharpest one), and *absolute* z ∈ {1e-1, 1e-2, 1e-3} (in loss units per unit² of weight; comparable
  across modules of one model, which the relative family is not).
  From the top-k eigenvalues alone N_eff is a lower bound; with an SLQ density it is estimated over the whole
  spectrum as n · E_SLQ[θ⁺/(θ⁺ + z)].
* **k_p** — the number of top eigenvalues holding a share p of the positive spectral mass tr(H⁺) = Σ λᵢ⁺
  (the "energy" rank used for low-rank approximations). The mass comes from the SLQ density
  (n · E_SLQ[θ⁺]); when the top-k eigenvalues do not reach p of it, k_p is reported as ``None`` (more than k).
* **count above a threshold** — the number of eigenvalues above τ · λ_max (exact among the top-k; from the
  SLQ density beyond).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .lanczos import SpectralDensity

RELATIVE_Z: tuple[float, ...] = (1e-1, 1e-2, 1e-3)
ABSOLUTE_Z: tuple[float, ...] = (1e-1, 1e-2, 1e-3)
MASS_SHARES: tuple[float, ...] = (0.5, 0.9, 0.99)
THRESHOLDS: tuple[float, ...] = (1e-1, 1e-2)


def n_eff(eigenvalues: Sequence[float] | np.ndarray, z: float) -> float:
    """N_eff(z) = Σ λ⁺/(λ⁺ + z) over the given eigenvalues (a lower bound when they are only the top ones)."""
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    return float(np.sum(lam / (lam + z)))


def n_eff_density(density: SpectralDensity, z: float) -> tuple[float, float]:
    """N_eff(z) over the whole spectrum from SLQ: n · E[Σ_j w_j θ_j⁺/(θ_j⁺ + z)], with its standard error."""
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    return density.trace_of(lambda t: np.clip(t, 0, None) / (np.clip(t, 0, None) + z))


def positive_mass(density: SpectralDensity) -> tuple[float, float]:
    """tr(H⁺) = Σ λᵢ⁺ estimated by SLQ (and its standard error)."""
    return density.trace_of(lambda t: np.clip(t, 0, None))


def k_mass(eigenvalues: Sequence[float] | np.ndarray, share: float, mass: float) -> int | None:
    """Smallest k with Σ_{i≤k} λᵢ⁺ ≥ share · mass (eigenvalues sorted descending); None if the list is too short."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    lam = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None))[::-1]
    if mass <= 0:
        return 0
    cum = np.cumsum(lam)
    hit = np.nonzero(cum >= share * mass * (1 - 1e-12))[0]
    return int(hit[0] + 1) if len(hit) else None


def count_above(eigenvalues: Sequence[float] | np.ndarray, threshold: float) -> int:
    return int(np.sum(np.asarray(eigenvalues) > threshold))


@dataclass(frozen=True)
class EffectiveDimension:
    """Effective-dimension measures of one scope; keys are the z / share / threshold values as strings."""

    lambda_max: float
    n_eff_relative_topk: dict[str, float]
    n_eff_absolute_topk: dict[str, float]
    n_eff_relative_slq: dict[str, float] | None
    n_eff_absolute_slq: dict[str, float] | None
    positive_mass: float | None
    positive_mass_se: float | None
    k_mass: dict[str, int | None]
    top_k_mass_share: float | None
    count_above_topk: dict[str, int]
    count_above_slq: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_dimensions(
    top_eigenvalues: Sequence[float] | np.ndarray,
    density: SpectralDensity | None = None,
    relative_z: Sequence[float] = RELATIVE_Z,
    absolute_z: Sequence[float] = ABSOLUTE_Z,
    shares: Sequence[float] = MASS_SHARES,
    thresholds: Sequence[float] = THRESHOLDS,
) -> EffectiveDimension:
    """All measures for one scope from its top eigenvalues and (optionally) its SLQ density."""
    lam = np.sort(np.asarray(top_eigenvalues, dtype=np.float64))[::-1]
    lmax = float(max(lam[0], 0.0)) if len(lam) else 0.0
    key = lambda x: f"{x:g}"
    rel = {key(c): n_eff(lam, c * lmax) if lmax > 0 else 0.0 for c in relative_z}
    ab = {key(z): n_eff(lam, z) for z in absolute_z}
    rel_slq = ab_slq = None
    mass = mass_se = None
    cnt_slq = None
    if density is not None:
        rel_slq = {key(c): n_eff_density(density, c * lmax)[0] if lmax > 0 else 0.0 for c in relative_z}
        ab_slq = {key(z): n_eff_density(density, z)[0] for z in absolute_z}
        mass, mass_se = positive_mass(density)
        # the top-k are exact; the SLQ mass can fall below their sum by sampling error
        mass = max(mass, float(np.clip(lam, 0, None).sum()))
        cnt_slq = {key(t): density.count_above(t * lmax)[0] for t in thresholds} if lmax > 0 else None
    km = {key(p): (k_mass(lam, p, mass) if mass is not None else None) for p in shares}
    share = float(np.clip(lam, 0, None).sum() / mass) if mass else None
    cnt = {key(t): count_above(lam, t * lmax) for t in thresholds}
    return EffectiveDimension(
        lambda_max=lmax,
        n_eff_relative_topk=rel,
        n_eff_absolute_topk=ab,
        n_eff_relative_slq=rel_slq,
        n_eff_absolute_slq=ab_slq,
        positive_mass=mass,
        positive_mass_se=mass_se,
        k_mass=km,
        top_k_mass_share=share,
        count_above_topk=cnt,
        count_above_slq=cnt_slq,
    )
