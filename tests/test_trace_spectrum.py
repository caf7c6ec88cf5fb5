from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.engine.lanczos import DenseOperator, SpectralDensity, slq
from hessrank.engine.spectrum import count_above, effective_dimensions, k_mass, n_eff, n_eff_density
from hessrank.engine.trace import hutchinson, hutchpp


def sym(eigs, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return torch.from_numpy((Q * eigs) @ Q.T)


@pytest.mark.parametrize("method", [hutchinson, hutchpp])
def test_trace_within_standard_errors(method):
    eigs = np.concatenate([[50.0, 20.0, 10.0], np.random.default_rng(0).normal(0.1, 0.2, 197)])
    A = sym(eigs)
    res = method(DenseOperator(A), 60, seed=0)
    assert abs(res.estimate - eigs.sum()) < 4 * res.std_error
    assert res.std_error > 0 and res.num_matvecs == 60
    again = method(DenseOperator(A), 60, seed=0)
    assert again.estimate == res.estimate


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    eigs = np.concatenate([100 * np.exp(-np.arange(10)), 0.01 * np.ones(190)])
    A = sym(eigs, 1)
    errs_h, errs_pp = [], []
    for seed in range(10):
        errs_h.append(abs(hutchinson(DenseOperator(A), 30, seed=seed).estimate - eigs.sum()))
        errs_pp.append(abs(hutchpp(DenseOperator(A), 30, seed=seed).estimate - eigs.sum()))
    assert np.mean(errs_pp) < 0.2 * np.mean(errs_h)


def test_trace_bad_sizes():
    A = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        hutchinson(A, 1)
    with pytest.raises(ValueError):
        hutchpp(A, 3)


def test_n_eff_formula_and_limits():
    lam = np.array([10.0, 1.0, 0.1, -5.0])
    assert n_eff(lam, 1.0) == pytest.approx(10 / 11 + 1 / 2 + 0.1 / 1.1)
    assert n_eff(lam, 1e-9) == pytest.approx(3.0, rel=1e-6)  # negative eigenvalue counts 0
    assert n_eff(lam, 1e9) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        n_eff(lam, 0.0)


def test_k_mass_and_count():
    lam = np.array([6.0, 3.0, 1.0])
    assert k_mass(lam, 0.5, 10.0) == 1
    assert k_mass(lam, 0.9, 10.0) == 2
    assert k_mass(lam, 0.99, 10.0) == 3
    assert k_mass(lam, 0.99, 12.0) is None  # the listed eigenvalues hold only 10 of 12
    assert count_above(lam, 2.0) == 2


def test_effective_dimensions_slq_matches_exact():
    rng = np.random.default_rng(3)
    eigs = np.concatenate([[8.0, 4.0, 2.0, 1.0], rng.uniform(-0.05, 0.05, 196)])
    A = sym(eigs, 2)
    d = slq(DenseOperator(A), num_probes=30, num_steps=40, seed=0)
    top = np.sort(eigs)[::-1][:10]
    ed = effective_dimensions(top, d)
    exact = n_eff(eigs, 0.01 * 8.0)
    est, se = n_eff_density(d, 0.01 * 8.0)
    assert abs(est - exact) < 4 * se + 0.05 * exact
    assert ed.n_eff_relative_topk["0.01"] <= exact + 1e-9  # top-k is a lower bound
    pos = np.clip(eigs, 0, None).sum()
    assert abs(ed.positive_mass - pos) < 4 * ed.positive_mass_se
    assert ed.k_mass["0.5"] == 2  # 8 < 0.5·17.3 ≤ 8 + 4
    assert ed.lambda_max == 8.0


def test_density_object_counts():
    d = SpectralDensity(
        nodes=np.array([[0.0, 1.0, 2.0]]), weights=np.array([[0.5, 0.25, 0.25]]), n=100, num_matvecs=3, seed=0
    )
    assert d.count_above(0.5)[0] == pytest.approx(50.0)
    assert d.trace_of(lambda x: x)[0] == pytest.approx(75.0)
