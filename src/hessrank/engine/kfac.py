"""Whole-module curvature by K-FAC: the loss decrease a rank-r update of each linear module can buy.

The top-k Lanczos pairs of a scope see k directions of a 10⁵–10⁷-dimensional space. This module models the
curvature of a *whole* linear module instead, with the Kronecker factors of K-FAC (Martens & Grosse, ICML 2015;
the "expand" form for weights shared over sequence positions, Eschenhagen et al., NeurIPS 2023):

    H_W ≈ c · A ⊗ G,    A = Σ_t x_t x_tᵀ / T,    G = Σ_t ĝ_t ĝ_tᵀ / N,

x_t the layer's inputs at the T real positions, ĝ_t the output gradients of the summed loss for labels *sampled
from the model* (so A ⊗ G estimates the Fisher = generalised Gauss–Newton of the cross-entropy), N the loss items,
and c a scalar calibration against the exact Hessian (below).

**Best rank-r update (formula).** With factored Tikhonov damping (Martens & Grosse §6.3, "π-damping")
Ā = A + π√δ·I, Ḡ = G + √δ/π·I, π² = (tr A / n)/(tr G / m), the quadratic model of the loss in a module's
weight W (m × n) is

    q(Δ) = ⟨∇W, Δ⟩ + ½ tr(Δᵀ Ḡ Δ Ā) = ⟨M, Y⟩ + ½‖Y‖²_F,   Y = Ḡ^½ Δ Ā^½,   M = Ḡ^-½ ∇W Ā^-½.

Ḡ^½ and Ā^½ are invertible, so rank(Y) = rank(Δ), and by Eckart–Young the minimum over rank-r updates is
Y = −[M]_r (the truncated SVD of the *whitened* gradient M), with

    ΔL(r) = −min_{rank Δ ≤ r} q(Δ) = ½ Σ_{j ≤ r} σ_j(M)².

(The SVD of the preconditioned step Ḡ⁻¹∇WĀ⁻¹ is *not* optimal: truncation must happen in whitened coordinates.)
This is the closed form the rank rule needs: the predicted loss decrease of a rank-r LoRA update, for every r, from
the full module curvature. ``tests/test_kfac.py`` checks it against a dense float64 optimisation of the exact
quadratic model over rank-r matrices.

**Noise (why the curve is cross-fitted).** The analysis sees a few dozen examples, while M has m·n entries: the
sample gradient is ∇W = ∇W̄ + ε, and ½‖M‖² is biased up by the whitened noise, E‖Ḡ^-½εĀ^-½‖² ≈ N_eff/N — on
MiniLM/SST-2 with 256 examples that bias was 10–30× the signal. The batches are therefore split into K ≥ 4
groups with whitened gradients M₁ … M_K. For a split of the groups into halves (P, Q), the singular directions
(u_l, v_l) come from the mean of P, and the energy along each from two *other* groups i ≠ j of Q:

    e_l = (u_lᵀ M_i v_l)(u_lᵀ M_j v_l),   E[e_l | P] = (u_lᵀ M̄ v_l)²   (independent noise cancels),

so ΔL̂(r) = ½ Σ_{l ≤ r} e_l is an unbiased estimate of the decrease the population quadratic model gives to the
best step along the r directions found in P. It is averaged over the splits (both halves of each). The
unbiased full-rank total is T = ½·mean_{i<j} ⟨M_i, M_j⟩. The curve's maximum over r is the decrease the data
*resolve*; its ratio to T says how much of the module's gradient signal lies in directions this sample can
resolve one by one (``resolved_share``). Held-out check: the first split's two halves give two independent
estimates of each module's gain (``gain_halves``), which module selection must agree with.

**Calibration against the exact Hessian.** For the top Lanczos eigenvectors vᵢ of a scope (exact, from HVPs),
the K-FAC Rayleigh quotient ρᵢ = Σ_m tr(V_{i,m}ᵀ G_m V_{i,m} A_m) (V_{i,m} the m-th module's block of vᵢ reshaped
to its weight) would equal λᵢ if H were exactly block-diagonal K-FAC. The scale c = Σᵢ λᵢ⁺ρᵢ / Σᵢ ρᵢ² is the
least-squares fit λᵢ ≈ c·ρᵢ (it also absorbs the cross-module coupling the block-diagonal model leaves out); the
ratios λᵢ/ρᵢ are reported, and their spread is the check of the K-FAC model on the directions where the exact
Hessian is known. The SLQ trace of the scope is compared with c·Σ_m tr(A_m)·tr(G_m) (the K-FAC trace) the same
way: a ratio far from 1 says K-FAC mis-models the tail. With H ≈ c·K, the decrease in loss units is ΔL/c and the
damping δ is set in K-FAC units as z·max_m λ_max(A_m)λ_max(G_m) (the same relative z as the Newton step's).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import HessrankError, NumericalError
from .tasks import _upcast, batch_to, loss_logits

log = logging.getLogger(__name__)

#: Groups the K-FAC batches are split into for the cross-fitted curves (≥ 4, even).
DEFAULT_GROUPS = 4


@dataclass
class ModuleStats:
    """One linear module's K-FAC factors and its true-label gradient per batch group (all float64, CPU).

    ``dtype`` is the precision the factor algebra runs in (:meth:`Eig.of`, :func:`module_curves`,
    :func:`hessrank.engine.quantization.compensation_curves`, :func:`rank_r_step`): the model's, float32 at least.
    The sums are float64; the eigendecompositions and SVDs of a float32 model's factors gain nothing from float64
    (their rounding, ~1e-7 of the largest eigenvalue, is far below each factor's damping α, β at z ≥ 1e-3; the
    curves and compensation shares agree with float64 to ~1e-6, ``tests/test_kfac.py``) and cost 2-3x as much.
    """

    A: torch.Tensor  #: n × n input second moment over real positions
    G: torch.Tensor  #: m × m output-gradient second moment (sampled labels), per loss item
    grads: list[torch.Tensor]  #: per group: the mean-loss gradient of the group's batches (m × n)
    dtype: torch.dtype = torch.float64  #: the precision of the factor algebra (the model's, float32 at least)
    _eig: Eig | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.G.shape[0]), int(self.A.shape[0])

    @property
    def eig(self) -> Eig:
        """The factors' eigen-decompositions, computed on first use and kept: the rank curves, the exact-Hessian
        check, the quantization compensation and the pilot all need them (two ``eigh`` per module; on a
        37-module MiniLM scope recomputing them cost 25 s of a 228 s analysis)."""
        if self._eig is None:
            self._eig = Eig.of(self)
        return self._eig


def _weight_grad(mod: nn.Module) -> torch.Tensor:
    """The (out × in) gradient of a linear module's weight (transformers' Conv1D stores (in, out))."""
    g = mod.weight.grad
    assert g is not None
    g = g.detach().double().cpu()
    return g.T if type(mod).__name__ == "Conv1D" else g


class _Recorder:
    """Forward hooks that keep each module's input and its output (a node of the graph) for the current batch."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.acts: dict[str, torch.Tensor] = {}
        self.outs: dict[str, torch.Tensor] = {}
        self.handles = [mod.register_forward_hook(self._hook(name)) for name, mod in modules.items()]

    def _hook(self, name: str) -> Any:
        def fwd(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.acts[name] = args[0].detach()
            if out.requires_grad:
                self.outs[name] = out

        return fwd

    def output_grads(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """∂loss/∂(each module's output) by ``torch.autograd.grad`` with the outputs as inputs: the backward
        stops at what they need and computes no weight gradient (a ``.backward()`` would, for every target
        module, and throw them away); a module off the loss' path gets zeros."""
        names = list(self.outs)
        grads = torch.autograd.grad(loss, [self.outs[n] for n in names], allow_unused=True)
        off = [n for n, g in zip(names, grads) if g is None]
        if off:
            log.warning("K-FAC: %s not on the loss' path (output gradient zero): no curvature", ", ".join(off))
        return {n: (torch.zeros_like(self.outs[n]) if g is None else g) for n, g in zip(names, grads)}

    def clear(self) -> None:
        self.acts.clear()
        self.outs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class _Sums:
    """Running sums: x xᵀ and ĝ ĝᵀ per module, true-label gradients per (module, group), and their counts."""

    groups: int
    factors: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    items: list[float] = field(default_factory=list)
    positions: int = 0
    fisher_items: int = 0
    dtype: torch.dtype = torch.float32  #: the model's precision, float32 at least (float64 once any input is)

    def __post_init__(self) -> None:
        self.items = [0.0] * self.groups

    def add_grad(self, name: str, k: int, g: torch.Tensor) -> None:
        cur = self.grads.setdefault(name, [None] * self.groups)[k]
        self.grads[name][k] = g if cur is None else cur + g

    def add_factors(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        # one batch's products in the model's precision (float32 at least), summed in float64: on a 37-module
        # MiniLM scope the float64 products were most of the statistics' time (the 1536-wide factors)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        if dt == torch.float64:
            self.dtype = dt
        x = x.reshape(-1, x.shape[-1]).to(dt)
        g = g.reshape(-1, g.shape[-1]).to(dt)
        xx, gg = (x.T @ x).double().cpu(), (g.T @ g).double().cpu()
        if name not in self.factors:
            self.factors[name] = [xx, gg]
        else:
            self.factors[name][0] += xx
            self.factors[name][1] += gg

    def result(self, names: Sequence[str]) -> dict[str, ModuleStats]:
        if min(self.items) <= 0:
            raise HessrankError("a K-FAC batch group has no loss items (raise --max-length)")
        out = {}
        for name in names:
            A, G = self.factors[name]
            grads = [gs / n for gs, n in zip(self.grads[name], self.items) if gs is not None]
            out[name] = ModuleStats(A / self.positions, G / self.fisher_items, grads, dtype=self.dtype)
        return out


def _batch_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batch: dict[str, torch.Tensor],
    b: int,
    rec: _Recorder,
    sums: _Sums,
    gen: torch.Generator,
) -> None:
    """One batch: the true-label gradient into group b mod groups, then the sampled-label output gradients."""
    k = b % sums.groups
    rec.clear()
    with torch.enable_grad():
        logits, target = loss_logits(model, batch)
        lg = _upcast(logits)
        true_loss = nn.functional.cross_entropy(lg, target, reduction="sum")
        if not torch.isfinite(true_loss):
            raise NumericalError(
                f"K-FAC statistics of {', '.join(list(modules)[:3])}{' ...' if len(modules) > 3 else ''}: "
                f"the loss of batch {b} is {float(true_loss)}; check the data and the model's dtype"
            )
        true_loss.backward(retain_graph=True)
        for name, mod in modules.items():
            sums.add_grad(name, k, _weight_grad(mod))
            mod.weight.grad = None
        probs = torch.softmax(lg.detach(), -1)
        y = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(lg.device)
        outgrads = rec.output_grads(nn.functional.cross_entropy(lg, y, reduction="sum"))
    sums.items[k] += int(target.shape[0])
    sums.fisher_items += int(target.shape[0])
    real = batch["attention_mask"].bool()
    sums.positions += int(real.sum())
    for name, mod in modules.items():
        x, g = rec.acts[name], outgrads[name]
        if x.dim() == 3:
            x, g = x[real], g[real]
        sums.add_factors(name, x, g)
        mod.weight.grad = None


def collect(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    groups: int = DEFAULT_GROUPS,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, ModuleStats]:
    """K-FAC factors and grouped true-label gradients of ``modules`` in one pass over ``batches``.

    Per batch: one forward (hooks record each module's input and output gradient), one backward of the summed
    true-label loss (kept per group: batch b goes to group b mod ``groups``), one backward of the summed loss for
    labels sampled from the model (the Fisher's output gradients). Only the modules' weights require grad.
    The cross-fitted curves need ``groups`` ≥ 4 (even); the factors alone (quantization compensation) need 1.
    """
    if groups < 1:
        raise HessrankError(f"K-FAC groups must be at least 1, got {groups}")
    if len(batches) < groups:
        raise HessrankError(f"K-FAC needs at least {groups} batches (one per group), got {len(batches)}")
    device = next(iter(modules.values())).weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    sums = _Sums(groups)
    it: Any = enumerate(batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(batches), desc="K-FAC statistics", leave=False)
    was_training = model.training
    model.eval()
    rec = _Recorder(modules)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for mod in modules.values():
            mod.weight.requires_grad_(True)
            mod.weight.grad = None
        for b, batch in it:
            _batch_statistics(model, modules, batch_to(batch, device), b, rec, sums, gen)
    finally:
        rec.remove()
        for mod in modules.values():
            mod.weight.grad = None
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    return sums.result(list(modules))


# ----------------------------------------------------------------------------------------------------------
# whitening and the rank curve
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eig:
    """Eigen-decompositions of a module's factors (computed once, reused for every damping)."""

    wA: torch.Tensor
    UA: torch.Tensor
    wG: torch.Tensor
    UG: torch.Tensor

    @classmethod
    def of(cls, st: ModuleStats) -> Eig:
        """``eigh`` of both factors in ``st.dtype`` (the model's precision), kept as float64."""
        wA, UA = torch.linalg.eigh(((st.A + st.A.T) / 2).to(st.dtype))
        wG, UG = torch.linalg.eigh(((st.G + st.G.T) / 2).to(st.dtype))
        return cls(wA.double().clamp(min=0), UA.double(), wG.double().clamp(min=0), UG.double())

    @property
    def lambda_max(self) -> float:
        """Largest eigenvalue of A ⊗ G: λ_max(A)·λ_max(G)."""
        return float(self.wA[-1] * self.wG[-1])

    @property
    def trace(self) -> float:
        """tr(A ⊗ G) = tr(A)·tr(G)."""
        return float(self.wA.sum() * self.wG.sum())


def damping_split(eig: Eig, delta: float) -> tuple[float, float]:
    """π-damping: (α, β) with Ā = A + αI, Ḡ = G + βI, αβ = δ and α/β = π² = (tr A/n)/(tr G/m)."""
    ta = float(eig.wA.mean())
    tg = float(eig.wG.mean())
    pi = (ta / tg) ** 0.5 if ta > 0 and tg > 0 else 1.0
    s = max(delta, 1e-300) ** 0.5
    return pi * s, s / pi


def rotate(eig: Eig, grads: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each gradient in the factors' eigenbases, U_Gᵀ ∇W_k U_A: the damping-independent part of :func:`whiten`
    (computed once per module, then scaled for every damping); in ``dtype`` when given (else the eigenbases')."""
    dt = dtype or eig.UA.dtype
    UGt, UA = eig.UG.T.to(dt), eig.UA.to(dt)
    return [UGt @ g.to(dt) @ UA for g in grads]


def whiten(
    eig: Eig, grads: Sequence[torch.Tensor], delta: float, rotated: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """M_k = Ḡ^-½ ∇W_k Ā^-½ for each group's gradient, expressed in the factors' eigenbases.

    The eigenbases are orthogonal, so singular values and inner products are those of Ḡ^-½∇WĀ^-½ itself.
    ``rotated`` (from :func:`rotate`) skips the two rotations when several dampings whiten the same gradients;
    the result has the dtype of the rotated gradients.
    """
    alpha, beta = damping_split(eig, delta)
    sa = (eig.wA + alpha).rsqrt()
    sg = (eig.wG + beta).rsqrt()
    rs = rotated if rotated is not None else rotate(eig, grads)
    return [(sg.to(r.dtype)[:, None] * r) * sa.to(r.dtype)[None, :] for r in rs]


def _splits(groups: int) -> list[tuple[list[int], list[int]]]:
    """Every partition of the groups into two equal halves, each half once as the direction half."""
    idx = list(range(groups))
    out = []
    for first in itertools.combinations(idx, groups // 2):
        if 0 not in first:
            continue  # each unordered partition once
        second = [i for i in idx if i not in first]
        out.append((list(first), second))
        out.append((second, list(first)))
    return out


#: singular values below this many √eps of the largest carry no direction :func:`_directions` can resolve: the
#: Gram matrix's eigenvalues are exact to about eps·σ₁², so σ is resolved down to about √eps·σ₁ (1e-7 of σ₁ in
#: float64, 2.4e-3 in float32)
_CUTOFF_SQRT_EPS = 7.0


def _relative_cutoff(dtype: torch.dtype) -> float:
    return _CUTOFF_SQRT_EPS * float(torch.finfo(dtype).eps) ** 0.5


def _directions(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular directions of ``D`` (m × n), largest singular value first: U (m × k) and V (n × k), k ≤ min(m, n).

    By ``eigh`` of the smaller Gram matrix (DᵀD = V S² Vᵀ, then U = D V S⁻¹, or the transpose), 3–5× faster than
    ``torch.linalg.svd`` on the analysis' module shapes; directions whose singular value is below
    :func:`_relative_cutoff` of the largest (where U would lose its accuracy) are left out — the cross-fitted
    energy along them is then 0, as if the direction half had no component there. Any directions that depend on
    the direction half only keep the cross-fitted energies unbiased; these are the SVD's up to sign (u and v flip
    together, which leaves u_lᵀM v_l unchanged).
    """
    tall = D.shape[0] >= D.shape[1]
    X = D if tall else D.T
    w, V = torch.linalg.eigh(X.T @ X)
    s = w.flip(0).clamp(min=0).sqrt()
    V = V.flip(1)
    k = int((s > s[0] * _relative_cutoff(D.dtype)).sum()) if s.numel() and s[0] > 0 else 0
    U = (X @ V[:, :k]) / s[:k]
    return (U, V[:, :k]) if tall else (V[:, :k], U)


def _energies(directions: torch.Tensor, Ms: Sequence[torch.Tensor], held: Sequence[int]) -> torch.Tensor:
    """e_l = mean over pairs i<j of ``held`` of (u_lᵀM_i v_l)(u_lᵀM_j v_l), directions from ``directions``
    (length min(m, n); zero past the directions :func:`_directions` resolves)."""
    U, V = _directions(directions)
    proj = [((U.T @ Ms[i]) * V.T).sum(1) for i in held]
    pairs = list(itertools.combinations(range(len(held)), 2))
    e = sum(proj[a] * proj[b] for a, b in pairs) / len(pairs)
    full = min(directions.shape)
    return torch.cat([e, e.new_zeros(full - e.numel())]) if e.numel() < full else e


@dataclass(frozen=True)
class RankCurve:
    """A module's cross-fitted predicted decrease ΔL̂(r) (K-FAC units) at ``ranks``, and its totals."""

    ranks: tuple[int, ...]
    decrease: tuple[float, ...]  #: running maximum of ½Σ_{l≤r} e_l (a rank-r adapter can do what rank r' < r does)
    total: float  #: unbiased full-rank total T = ½·mean_{i<j}⟨M_i, M_j⟩
    in_sample: float  #: ½‖mean M‖², biased up by the sample's noise (for comparison)
    gain_halves: tuple[float, float]  #: the curve's maximum from each half of the first split (held-out check)

    @property
    def peak(self) -> float:
        return max(0.0, max(self.decrease)) if self.decrease else 0.0

    @property
    def resolved_share(self) -> float | None:
        return self.peak / self.total if self.total > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": list(self.ranks),
            "decrease": list(self.decrease),
            "total": self.total,
            "in_sample": self.in_sample,
            "gain_halves": list(self.gain_halves),
            "peak": self.peak,
            "resolved_share": self.resolved_share,
        }


def rank_curve(Ms: Sequence[torch.Tensor], rank_grid: Sequence[int]) -> RankCurve:
    """The cross-fitted curve from the groups' whitened gradients ``Ms`` (see the module docstring)."""
    K = len(Ms)
    if K < 4:
        raise HessrankError(f"the cross-fitted rank curve needs at least 4 gradient groups, got {K}")
    full = min(Ms[0].shape)
    ranks = tuple([r for r in rank_grid if r < full] + [full])
    curves = []
    halves: list[float] = []
    for s, (P, Q) in enumerate(_splits(K)):
        e = _energies(sum(Ms[i] for i in P) / len(P), Ms, Q)
        c = 0.5 * torch.cumsum(e.double(), 0)  # the sums in float64 whatever the factor algebra's precision
        curves.append(c)
        if s < 2:
            halves.append(max(0.0, float(c.max())))
    mean = torch.stack(curves).mean(0)
    run = torch.cummax(mean, 0).values
    pairs = list(itertools.combinations(range(K), 2))
    total = 0.5 * sum(float((Ms[i].double() * Ms[j].double()).sum()) for i, j in pairs) / len(pairs)
    mbar = sum(M.double() for M in Ms) / K
    return RankCurve(
        ranks,
        tuple(float(run[r - 1]) for r in ranks),
        total,
        0.5 * float((mbar**2).sum()),
        (halves[0], halves[1]),
    )


def rayleigh_quotients(
    vectors_by_module: dict[str, torch.Tensor], stats: dict[str, ModuleStats], shapes: dict[str, tuple[int, int]]
) -> list[float]:
    """ρᵢ = Σ_m vec(V_{i,m})ᵀ(A_m ⊗ G_m)vec(V_{i,m}) = Σ_m tr(V_{i,m}ᵀ G_m V_{i,m} A_m) for each eigenvector i.

    ``vectors_by_module[m]`` is (k × out·in), the eigenvectors restricted to module m (rows).
    """
    rho: torch.Tensor | None = None
    for m, V in vectors_by_module.items():
        if m not in stats:
            continue
        o, i = shapes[m]
        Vm = V.double().cpu().view(-1, o, i)
        st = stats[m]
        part = ((st.G @ Vm) * (Vm @ st.A)).sum(dim=(1, 2))
        rho = part if rho is None else rho + part
    return [] if rho is None else rho.tolist()


def calibration(eigenvalues: Sequence[float], rho: Sequence[float]) -> dict[str, Any]:
    """c = Σλᵢ⁺ρᵢ / Σρᵢ² (least squares λ ≈ c·ρ) with the per-eigenvector ratios λᵢ/ρᵢ."""
    lam = [max(float(x), 0.0) for x in eigenvalues]
    num = sum(a * b for a, b in zip(lam, rho))
    den = sum(b * b for b in rho)
    ratios = [a / b if b > 0 else None for a, b in zip(lam, rho)]
    return {"scale": num / den if den > 0 else None, "ratios": ratios, "rho": list(rho)}


def module_curves(
    stats: dict[str, ModuleStats], z_family: Sequence[float], rank_grid: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Per damping z (relative to the largest K-FAC eigenvalue over ``stats``): each module's rank curve."""
    eigs = {m: st.eig for m, st in stats.items()}
    ref = max(e.lambda_max for e in eigs.values())
    if not ref > 0:
        raise HessrankError("K-FAC: every target module has zero curvature (is the loss constant?)")
    out: dict[str, dict[str, Any]] = {}
    rotated = {m: rotate(eigs[m], stats[m].grads, stats[m].dtype) for m in stats}
    for z in z_family:
        delta = z * ref
        out[f"{z:g}"] = {
            "delta": delta,
            "modules": {
                m: rank_curve(whiten(eigs[m], stats[m].grads, delta, rotated[m]), rank_grid).to_dict() for m in stats
            },
        }
    return {
        "reference_lambda_max": ref,
        "per_z": out,
        "factors": {m: {"lambda_max": e.lambda_max, "trace": e.trace} for m, e in eigs.items()},
    }


def rank_r_steps(
    eig: Eig, grad: torch.Tensor, delta: float, ranks: Sequence[int], dtype: torch.dtype | None = None
) -> dict[int, torch.Tensor]:
    """The K-FAC-optimal rank-r updates Δ_r = −Ḡ^-½ [M]_r Ā^-½ of one module for every r in ``ranks`` (weight
    coordinates, m × n, float64), from one decomposition of M (:func:`_directions`, in ``dtype`` when given:
    :attr:`ModuleStats.dtype`); [M]_r = Σ_{l≤r} σ_l u_l v_lᵀ over the directions M resolves."""
    alpha, beta = damping_split(eig, delta)
    (M,) = whiten(eig, [grad], delta, rotate(eig, [grad], dtype))
    U, V = _directions(M)
    S = ((U.T @ M) * V.T).sum(1)  # σ_l = u_lᵀ M v_l
    dt = M.dtype
    sa = (eig.wA + alpha).rsqrt().to(dt)
    sg = (eig.wG + beta).rsqrt().to(dt)
    UG, UA = eig.UG.to(dt), eig.UA.to(dt)
    out = {}
    for r in ranks:
        Y = -(U[:, :r] * S[:r]) @ V[:, :r].T
        out[r] = (UG @ ((sg[:, None] * Y) * sa[None, :]) @ UA.T).double()
    return out


def rank_r_step(
    eig: Eig, grad: torch.Tensor, delta: float, rank: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The K-FAC-optimal rank-r update Δ = −Ḡ^-½ [M]_r Ā^-½ of one module (:func:`rank_r_steps` for one r)."""
    return rank_r_steps(eig, grad, delta, [rank], dtype)[rank]
