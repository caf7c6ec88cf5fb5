"""Quantization sensitivity: what each bitsandbytes weight format costs in loss, predicted and measured.

For a module's weight W and a format f, the quantization perturbation is δ = dequant(quant(W)) − W (the change
quantization applies to the weights), computed with bitsandbytes' own functions (they run on CPU). Its cost in
loss is, to second order,

    ΔL ≈ gᵀδ + ½ δᵀHδ                                                  (Taylor expansion at θ₀)

with g and H the gradient and Hessian of the fine-tuning loss (:class:`hessrank.HessianOperator`). For all target
modules together δᵀHδ is one HVP per format (``targets.predicted_loss_increase``). Per module, the quadratic term
comes from one of three sources (``quadratic_source``):

* **K-FAC** (the default, no HVP): ½ tr(δ_mᵀ G δ_m A) with the module's Kronecker factors (below) — the Fisher/GGN
  form, in the K-FAC units of ``analysis.json``'s ``calibration`` (multiply by its scale c for loss units);
* **random signs** (``sign_probes`` > 0): with δ_s = Σ_m s_m δ_m for Rademacher signs s, s_m·δ_mᵀ(Hδ_s)_m is an
  *unbiased* estimate of δ_mᵀH_mmδ_m for every module at once (the cross terms have mean zero); P sign vectors
  cost P HVPs for all modules (Hutchinson's idea applied to the block diagonal). Its variance grows with the
  number of modules (the cross terms sum over all the others);
* **exact block** (``exact``, opt-in): δ_mᵀ H_mm δ_m from one HVP per module and format.

Why K-FAC is the default (``benchmarks/quant_rankers.py`` on the archived validation analyses, 12–60 modules):
where any estimate ranks the modules at all (Spearman ρ with the measured increase ≥ 0.36) the sign-probe, K-FAC
and gradient-only predictions agree within 0.03, elsewhere all three lie within ±0.16 of zero, while the sign
probes and their traces cost 4·(formats) + 4 HVPs — 16 of the 45 HVPs of a 37-module analysis. HAWQ's trace proxy
(Dong et al., HAWQ-V2, NeurIPS 2020), ½·(tr H_mm / n_m)·‖δ_m‖², takes tr H_mm from Hutchinson on the block
diagonal when sign probes run, else from K-FAC (tr A·tr G; ``trace_source``).

The *measured* ΔL replaces W by dequant(quant(W)) (in the model's float dtype) and evaluates held-out batches:
for the target modules together and for every linear layer that bitsandbytes would quantize (all but the output
layer and classification heads), always; per module (one module quantized at a time) when ``module_evals`` asks.
The per-module increases matter to the advisor only for a skip list (:func:`hessrank.advisor.quant.format_options`),
and a skip list can help only when the whole-model increase exceeds the tolerance *and* the target modules
together cost enough to bring it back under: ``module_evals="auto"`` measures them exactly then (at the advisor's
default tolerance, ``tolerance``), ``"all"`` always, ``"none"`` never. One evaluation per module and format was
27 s of the 228 s analysis above and ~60 s on SmolLM2's 60 q/v modules. With ``exact`` the per-module increase
is also measured *in sample* (on the analysis batches the prediction was made on), which separates the Taylor
model's error from the sampling noise of a small held-out set.

**Compensation rank.** LoRA can add back a rank-r correction C of δ. With the Kronecker-factored curvature of a
linear layer (K-FAC; Martens & Grosse, ICML 2015), H_mm ≈ A ⊗ G with A = E[xxᵀ] over the layer's inputs and
G = E[ĝĝᵀ] over its output gradients for labels sampled from the model (the Fisher/GGN form), the quadratic cost
of a residual is ½‖G^½(δ − C)A^½‖²_F, and the best rank-r correction is the truncated SVD of G^½ δ A^½
(Eckart–Young) mapped back. The share of the quadratic cost it removes is Σ_{j≤r} σ_j² / Σ_j σ_j²; the plain
(unweighted) SVD share Σ_{j≤r} s_j² / Σ s_j² is reported beside it. The K-FAC quadratic ½tr(δᵀGδA) is compared
with the exact block term (when measured) so the approximation's quality is on record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import HessrankError
from .kfac import Eig, ModuleStats

log = logging.getLogger(__name__)

#: The advisor's default tolerance (share of the held-out loss a format may add; :mod:`hessrank.advisor.quant`),
#: which also decides the per-module evaluations here (``module_evals="auto"``)
DEFAULT_TOLERANCE = 0.02

#: Formats hessrank can measure (bitsandbytes applies one per model; see ``FORMAT_INFO``).
FORMATS: tuple[str, ...] = ("int8", "llm.int8", "nf4", "fp4", "nf4-dq")


@dataclass(frozen=True)
class FormatInfo:
    name: str
    bits: int
    description: str
    bnb: dict[str, Any]  #: BitsAndBytesConfig arguments that load a model in this format


FORMAT_INFO: dict[str, FormatInfo] = {
    "int8": FormatInfo(
        "int8", 8, "8-bit blockwise dynamic quantization (bnb quantize_blockwise, blocksize 64)", {"load_in_8bit": True}
    ),
    "llm.int8": FormatInfo(
        "llm.int8", 8, "LLM.int8 row-wise absmax int8 weights (what load_in_8bit stores)", {"load_in_8bit": True}
    ),
    "nf4": FormatInfo(
        "nf4",
        4,
        "4-bit NormalFloat, blocksize 64, fp32 absmax per block",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
    ),
    "fp4": FormatInfo(
        "fp4",
        4,
        "4-bit float, blocksize 64, fp32 absmax per block",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
    ),
    "nf4-dq": FormatInfo(
        "nf4-dq",
        4,
        "NF4 with double quantization of the absmax constants (QLoRA)",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    ),
}


def bytes_per_param(fmt: str, blocksize: int = 64, in_features: int = 4096) -> float:
    """Storage per weight including quantization constants (bitsandbytes' layouts).

    int8 blockwise: 1 byte + one fp32 absmax per block. LLM.int8: 1 byte + one fp32 scale per row (÷ in_features).
    NF4/FP4: ½ byte + one fp32 absmax per block of 64. NF4 double quant: the absmax values are themselves
    quantized to 8 bits in blocks of 256 with an fp32 absmax each (QLoRA: 0.127 bit/param of constants).
    "none" (fp32) 4 bytes; "bf16"/"fp16" 2 bytes.
    """
    if fmt in ("none", "fp32", "float32"):
        return 4.0
    if fmt in ("bf16", "fp16", "bfloat16", "float16"):
        return 2.0
    if fmt == "int8":
        return 1.0 + 4.0 / blocksize
    if fmt == "llm.int8":
        return 1.0 + 4.0 / max(in_features, 1)
    if fmt in ("nf4", "fp4"):
        return 0.5 + 4.0 / blocksize
    if fmt == "nf4-dq":
        return 0.5 + 1.0 / blocksize + 4.0 / (blocksize * 256)
    raise HessrankError(f"format '{fmt}' is not one of none, bf16, {', '.join(FORMATS)}")


def quantize_dequantize(W: torch.Tensor, fmt: str, blocksize: int = 64) -> torch.Tensor:
    """dequant(quant(W)) with bitsandbytes' functions, in W's dtype and shape (CPU or CUDA)."""
    import bitsandbytes.functional as F

    if fmt not in FORMATS:
        raise HessrankError(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    w = W.detach()
    if fmt == "int8":
        q, st = F.quantize_blockwise(w.float().contiguous(), blocksize=blocksize)
        out = F.dequantize_blockwise(q, st)
    elif fmt == "llm.int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.half().contiguous())
        out = F.int8_vectorwise_dequant(cb, scb)
    else:
        qt = "fp4" if fmt == "fp4" else "nf4"
        q, st = F.quantize_4bit(
            w.float().contiguous(), blocksize=blocksize, quant_type=qt, compress_statistics=(fmt == "nf4-dq")
        )
        out = F.dequantize_4bit(q, st)
    return out.to(dtype=W.dtype).view_as(W)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (None for fewer than 3 points or a constant input)."""
    if len(x) < 3:
        return None
    from scipy.stats import spearmanr

    r = spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic
    return None if r is None or not np.isfinite(r) else float(r)


@torch.no_grad()
def mean_loss(
    model: nn.Module, loss_fn: Callable, batches: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> float:
    total = 0.0
    for w, b in zip(weights, batches):
        total += w * float(loss_fn(model, b))
    return total / float(sum(weights))


def kfac_factors(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    task: str | None = None,
    seed: int = 0,
) -> dict[str, ModuleStats]:
    """{module: statistics}: the K-FAC factors A, G of :func:`hessrank.engine.kfac.collect` (labels sampled from
    the model), float64, with their eigen-decompositions cached (``.eig``: computed in ``ModuleStats.dtype``, kept
    as float64).

    ``task`` is not needed (the batch's label shape says it) and kept for callers that pass it.
    """
    from .kfac import collect

    del task
    return collect(model, modules, batches, groups=1, seed=seed)


def _psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh((M + M.T) / 2)
    return (V * w.clamp(min=0).sqrt()) @ V.T


def compensation_curves(
    delta: torch.Tensor,
    A: torch.Tensor,
    G: torch.Tensor,
    ranks: Sequence[int],
    eig: Eig | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Shares of ‖δ‖² (plain SVD) and of the K-FAC quadratic ½‖G^½δA^½‖² (weighted SVD) removed at each rank.

    ``eig`` (the factors' eigen-decompositions, :class:`hessrank.engine.kfac.Eig`) saves two ``eigh``: with
    A = U_A Λ_A U_Aᵀ and G = U_G Λ_G U_Gᵀ, G^½δA^½ = U_G (Λ_G^½ U_Gᵀ δ U_A Λ_A^½) U_Aᵀ has the singular values of
    the middle factor (orthogonal invariance). With ``eig`` the SVDs run in ``dtype`` (the model's precision,
    :attr:`hessrank.engine.kfac.ModuleStats.dtype`), without it the weighted one in float64; the shares are summed
    in float64.
    """
    d = delta.detach().cpu().to(dtype)
    o, i = G.shape[0], A.shape[0]
    if d.shape != (o, i):
        if d.shape == (i, o):  # transformers' Conv1D stores (in, out)
            d = d.T
        else:
            raise HessrankError(f"weight shape {tuple(d.shape)} does not match its K-FAC factors ({o} x {i})")
    s_plain = torch.linalg.svdvals(d).double()
    e_plain = torch.cumsum(s_plain**2, 0) / (s_plain**2).sum().clamp(min=1e-300)
    if eig is not None:
        rot = eig.UG.T.to(dtype) @ d @ eig.UA.to(dtype)
        mid = eig.wG.sqrt().to(dtype)[:, None] * rot * eig.wA.sqrt().to(dtype)[None, :]
        s_w = torch.linalg.svdvals(mid).double()
    else:
        Gh, Ah = _psd_sqrt(G.cpu().double()), _psd_sqrt(A.cpu().double())
        s_w = torch.linalg.svdvals(Gh @ d.double() @ Ah)
    e_w = torch.cumsum(s_w**2, 0) / (s_w**2).sum().clamp(min=1e-300)
    rmax = len(s_plain)
    rs = [r for r in ranks if r < rmax] + [rmax]
    return {
        "ranks": rs,
        "plain_share": [float(e_plain[r - 1]) for r in rs],
        "kfac_share": [float(e_w[r - 1]) for r in rs],
        "kfac_quadratic": float(0.5 * (s_w**2).sum()),
    }


def rank_for_share(curve: dict[str, Any], key: str, share: float) -> int:
    """Smallest listed rank whose share reaches ``share`` (the full rank if none does earlier)."""
    for r, s in zip(curve["ranks"], curve[key]):
        if s >= share - 1e-12:
            return int(r)
    return int(curve["ranks"][-1])


def block_quadratic_signs(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    slices: dict[str, tuple[int, int]],
    deltas: dict[str, torch.Tensor],
    n: int,
    probes: int,
    gen: torch.Generator,
) -> dict[str, float]:
    """Unbiased estimates of every block quadratic form δ_mᵀ H_mm δ_m from ``probes`` HVPs.

    With Rademacher signs s and δ_s = Σ_m s_m δ_m, s_m δ_mᵀ (H δ_s)_m = δ_mᵀH_mmδ_m + Σ_{m'≠m} s_m s_m' δ_mᵀH_mm'δ_m',
    and the cross terms have mean zero; the estimate is the average over the probes.
    """
    est = {m: 0.0 for m in slices}
    first = next(iter(deltas.values()))
    for _ in range(probes):
        signs = {m: float(torch.randint(0, 2, (1,), generator=gen).item() * 2 - 1) for m in slices}
        v = torch.zeros(n, dtype=first.dtype, device=first.device)
        for m, (a, b) in slices.items():
            v[a:b] = signs[m] * deltas[m]
        hv = matvec(v).double()
        for m, (a, b) in slices.items():
            est[m] += signs[m] * float(deltas[m].double().to(hv.device) @ hv[a:b]) / probes
    return est


def bnb_quantized_linears(model: nn.Module) -> list[str]:
    """Linear layers bitsandbytes would quantize: every linear but the output layer and classification heads."""
    from ..models import _excluded_from_all_linear, linear_modules

    excl = _excluded_from_all_linear(model)
    return [n for n in linear_modules(model) if n not in excl]


@dataclass
class _Bench:
    """What every format's measurement shares: the operator, its gradient, base losses and weight swaps."""

    model: nn.Module
    loss_fn: Callable
    op: Any
    eval_batches: list[dict[str, torch.Tensor]]
    g: torch.Tensor
    base_eval: float
    base_in: float | None

    def loss_with(self, replace: dict[str, torch.Tensor], in_sample: bool = False) -> float:
        """Mean loss with some weights replaced, without touching the parameters (the operator's kept gradient
        graphs hold them, and an in-place edit would invalidate those graphs)."""
        from torch.nn.utils.stateless import _reparametrize_module

        from .tasks import loss_weight

        batches = self.op.batches if in_sample else self.eval_batches
        with _reparametrize_module(self.model, replace, strict=False):
            return mean_loss(self.model, self.loss_fn, batches, [float(loss_weight(b)) for b in batches])

    def vec_of(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        mods = {s.module: s for s in self.op.slices}
        v = torch.zeros(self.op.n, dtype=self.op.dtype, device=self.op.device)
        for m, d in parts.items():
            s = mods[m]
            v[s.start : s.stop] = d.reshape(-1).to(v)
        return v


def _block_traces(op: Any, probes: int, gen: torch.Generator) -> dict[str, float]:
    """tr(H_mm) of every module at once: Hutchinson on the block diagonal (``probes`` HVPs)."""
    mods = {s.module: s for s in op.slices}
    est = {m: 0.0 for m in mods}
    for _ in range(probes):
        z = (torch.randint(0, 2, (op.n,), generator=gen) * 2 - 1).to(dtype=op.dtype, device=op.device)
        hz = op.matvec(z).double()
        for m, s in mods.items():
            est[m] += float(z[s.start : s.stop].double() @ hz[s.start : s.stop]) / probes
    return est


#: the per-module evaluation choices of :func:`measure_quantization` (``module_evals``)
MODULE_EVALS: tuple[str, ...] = ("auto", "all", "none")


def skip_list_can_help(whole: float, targets: float, limit: float) -> bool:
    """Whether keeping some target modules unquantized can bring the measured whole-model increase ``whole``
    under ``limit``: it must exceed the limit, and skipping removes at most what the targets cost together
    (``targets``), the rule of :func:`hessrank.advisor.quant.format_options`."""
    return whole > limit and whole - max(0.0, targets) <= limit


def _quadratics(
    bench: _Bench, deltas: dict[str, torch.Tensor], exact: bool, sign_probes: int, gen: torch.Generator
) -> tuple[dict[str, float], dict[str, float] | None]:
    """The exact block quadratics δ_mᵀH_mmδ_m (``exact``: one HVP per module) and the random-sign estimates
    (``sign_probes`` HVPs for all modules; None without probes)."""
    op = bench.op
    mods = {s.module: s for s in op.slices}
    exact_q: dict[str, float] = {}
    if exact:
        for m in mods:
            hv = op.matvec(bench.vec_of({m: deltas[m]})).double()
            s = mods[m]
            exact_q[m] = float(deltas[m].reshape(-1).double().to(hv.device) @ hv[s.start : s.stop])
    if not sign_probes:
        return exact_q, None
    sign_q = block_quadratic_signs(
        op.matvec,
        {m: (s.start, s.stop) for m, s in mods.items()},
        {m: d.reshape(-1) for m, d in deltas.items()},
        op.n,
        sign_probes,
        gen,
    )
    return exact_q, sign_q


def _module_rows(
    bench: _Bench,
    weights: dict[str, torch.Tensor],
    deltas: dict[str, torch.Tensor],
    quadratics: tuple[dict[str, float], dict[str, float] | None],
    measure: bool,
    traces: dict[str, float],
    factors: dict[str, ModuleStats],
    rank_grid: Sequence[int],
) -> dict[str, Any]:
    """Per module: predicted (gradient term + ½ quadratic), HAWQ, K-FAC, compensation curve, and with ``measure``
    the measured increase (None otherwise)."""
    mods = {s.module: s for s in bench.op.slices}
    exact_q, sign_q = quadratics
    per: dict[str, Any] = {}
    for m, W in weights.items():
        s, d = mods[m], deltas[m]
        lin = float(bench.g[s.start : s.stop] @ d.reshape(-1).double().to(bench.g.device))
        st = factors[m]
        comp = compensation_curves(d, st.A, st.G, rank_grid, eig=st.eig, dtype=st.dtype)
        q_kfac = comp["kfac_quadratic"] * 2
        if m in exact_q:
            q, source = exact_q[m], "exact"
        elif sign_q is not None:
            q, source = sign_q[m], "signs"
        else:
            q, source = q_kfac, "kfac"
        replace = {f"{m}.weight": W.detach() + d}
        dn2 = float((d.double() ** 2).sum())
        per[m] = {
            "predicted_loss_increase": lin + 0.5 * q,
            "quadratic_source": source,
            "gradient_term": lin,
            "quadratic_exact": exact_q.get(m),
            "quadratic_signs": sign_q[m] if sign_q is not None else None,
            "quadratic_kfac": q_kfac,
            "hawq_proxy": 0.5 * traces[m] / W.numel() * dn2,
            "block_trace": traces[m],
            "delta_rel_norm": float(d.double().norm() / W.detach().double().norm()),
            "measured_loss_increase": bench.loss_with(replace) - bench.base_eval if measure else None,
            "measured_in_sample": (
                bench.loss_with(replace, in_sample=True) - bench.base_in
                if measure and bench.base_in is not None
                else None
            ),
            "compensation": {k: v for k, v in comp.items() if k != "kfac_quadratic"},
        }
    return per


def _correlations(per: dict[str, Any], exact: bool) -> tuple[dict[str, float | None], float | None, float | None]:
    """Spearman correlations over modules (None where the per-module increases were not measured), and (with exact
    blocks) the sign estimate's and K-FAC's accuracy."""
    names = list(per)
    measured = [per[m]["measured_loss_increase"] for m in names]
    if any(v is None for v in measured):
        return {"predicted": None, "quadratic_signs": None, "quadratic_kfac": None, "hawq_proxy": None}, None, None

    def with_quadratic(key: str) -> float | None:
        qs = [per[m][key] for m in names]
        if any(q is None for q in qs):
            return None
        return spearman([per[m]["gradient_term"] + 0.5 * q for m, q in zip(names, qs)], measured)

    corr = {
        "predicted": spearman([per[m]["predicted_loss_increase"] for m in names], measured),
        "quadratic_signs": with_quadratic("quadratic_signs"),
        "quadratic_kfac": with_quadratic("quadratic_kfac"),
        "hawq_proxy": spearman([per[m]["hawq_proxy"] for m in names], measured),
    }
    if not exact:
        return corr, None, None
    ins = [per[m]["measured_in_sample"] for m in names]
    corr["predicted_vs_in_sample"] = spearman([per[m]["predicted_loss_increase"] for m in names], ins)
    corr["hawq_vs_in_sample"] = spearman([per[m]["hawq_proxy"] for m in names], ins)
    qe = np.array([per[m]["quadratic_exact"] for m in names])
    qk = np.array([per[m]["quadratic_kfac"] for m in names])
    sign_err = None
    if per[names[0]]["quadratic_signs"] is not None:
        qs = np.array([per[m]["quadratic_signs"] for m in names])
        sign_err = float(np.median(np.abs(qs - qe) / np.maximum(np.abs(qe), 1e-30)))
    kfac_ratio = float(np.median(qk / np.where(np.abs(qe) > 0, qe, np.nan)))
    return corr, sign_err, kfac_ratio


def _measure_modules(module_evals: str, exact: bool, whole: float, targets: float, limit: float) -> tuple[bool, str]:
    """Whether to measure the modules one by one for a format, and why (see the module docstring)."""
    if exact:
        return True, "exact measurement asked (--quant-exact)"
    if module_evals == "all":
        return True, "asked (--quant-module-evals all)"
    if module_evals == "none":
        return False, "not asked (--quant-module-evals none)"
    if skip_list_can_help(whole, targets, limit):
        return True, "a skip list of target modules can bring the whole-model increase under the tolerance"
    if whole <= limit:
        return False, "the whole-model increase is within the tolerance: no skip list is needed"
    return False, "the target modules together cost too little for a skip list to reach the tolerance"


def measure_quantization(
    model: nn.Module,
    loss_fn: Callable,
    task: str,
    op: Any,
    eval_batches: Sequence[dict[str, torch.Tensor]],
    formats: Sequence[str],
    sign_probes: int = 0,
    exact: bool = False,
    seed: int = 0,
    rank_grid: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
    progress: bool = False,
    factors: dict[str, ModuleStats] | None = None,
    module_evals: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Predicted and measured loss increase of each format, per target module and for the whole model.

    ``op`` is a :class:`hessrank.HessianOperator` whose scope is the target modules' weights (the joint scope);
    ``eval_batches`` are held-out batches. Each weight is quantized and dequantized once per format with
    bitsandbytes' functional API; the measured increases are ordinary forwards with the dequantized fp32 weight
    swapped in. ``factors`` are the modules' K-FAC statistics (:func:`hessrank.engine.kfac.collect`; computed here
    from ``op.batches`` when not given). ``module_evals`` (auto | all | none) and ``tolerance`` (a share of the
    held-out loss) decide the per-module evaluations (module docstring).

    Cost per format: one HVP (all targets together), one held-out evaluation for the targets together and one
    for the whole model, plus one per module when they are measured; ``sign_probes`` > 0 adds that many HVPs per
    format and ``max(sign_probes, 2)`` once for Hutchinson block traces. ``exact`` (opt-in: the expensive
    measurement) adds one HVP per module and an in-sample evaluation per module.
    """
    from .tasks import batch_to, loss_weight

    for f in formats:
        if f not in FORMATS:
            raise HessrankError(f"quantization format '{f}' is not one of {', '.join(FORMATS)}")
    if module_evals not in MODULE_EVALS:
        raise HessrankError(f"quant-module-evals must be one of {', '.join(MODULE_EVALS)}, got {module_evals!r}")
    named = dict(model.named_modules())
    mods = [s.module for s in op.slices]
    weights = {m: named[m].weight for m in mods}
    # the operator moved its own batches to the model's device; the held-out ones must follow (found on CUDA)
    eval_batches = [batch_to(b, op.device) for b in eval_batches]
    base_eval = mean_loss(model, loss_fn, eval_batches, [float(loss_weight(b)) for b in eval_batches])
    base_in = mean_loss(model, loss_fn, op.batches, [float(loss_weight(b)) for b in op.batches]) if exact else None
    bench = _Bench(model, loss_fn, op, eval_batches, op.gradient().double(), base_eval, base_in)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if factors is None:
        factors = kfac_factors(model, {m: named[m] for m in mods}, op.batches, task, seed=seed)
    hutchinson = bool(sign_probes) or exact
    traces = _block_traces(op, max(sign_probes, 2), gen) if hutchinson else {m: factors[m].eig.trace for m in mods}
    out: dict[str, Any] = {
        "formats": {},
        "base_eval_loss": base_eval,
        "base_in_sample_loss": base_in,
        "sign_probes": sign_probes,
        "exact_blocks": exact,
        "trace_source": "hutchinson" if hutchinson else "kfac",
        "module_evals": module_evals,
        "tolerance": tolerance,
        "num_eval_batches": len(eval_batches),
    }
    it: Any = list(formats)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="quantization formats", leave=False)
    all_linear = bnb_quantized_linears(model)
    limit = tolerance * max(base_eval, 1e-12)
    for fmt in it:
        deltas = {m: (quantize_dequantize(W, fmt) - W.detach()) for m, W in weights.items()}
        dall = bench.vec_of(deltas).double()
        hall = op.matvec(dall.to(op.dtype)).double()
        targets_w = {f"{m}.weight": W.detach() + deltas[m] for m, W in weights.items()}
        # every linear layer bitsandbytes would quantize: the target modules reuse their δ
        whole = {
            f"{n}.weight": (targets_w[f"{n}.weight"] if n in weights else quantize_dequantize(named[n].weight, fmt))
            for n in all_linear
        }
        targets_inc = bench.loss_with(targets_w) - base_eval
        whole_inc = bench.loss_with(whole) - base_eval
        measure, why = _measure_modules(module_evals, exact, whole_inc, targets_inc, limit)
        quads = _quadratics(bench, deltas, exact, sign_probes, gen)
        per = _module_rows(bench, weights, deltas, quads, measure, traces, factors, rank_grid)
        corr, sign_err, kfac_ratio = _correlations(per, exact)
        out["formats"][fmt] = {
            "bits": FORMAT_INFO[fmt].bits,
            "description": FORMAT_INFO[fmt].description,
            "modules": per,
            "modules_measured": measure,
            "modules_measured_reason": why,
            "targets": {
                "predicted_loss_increase": float(bench.g @ dall + 0.5 * (dall @ hall)),
                "measured_loss_increase": targets_inc,
            },
            "whole_model": {
                "measured_loss_increase": whole_inc,
                "num_linear_layers": len(all_linear),
            },
            "spearman": corr,
            "sign_estimate_median_rel_error": sign_err,
            "kfac_over_exact_median": kfac_ratio,
        }
    return out, {}
