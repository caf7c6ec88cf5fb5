"""The pilot estimator (:mod:`hessrank.analysis.pilot`) against ground truth.

* whitened truncation is the best rank-r approximation of the pilot update under the K-FAC quadratic
  ½ vec(δ)ᵀ(Ḡ ⊗ Ā)vec(δ) (dense float64 L-BFGS over rank-r matrices), and its cost is ½Σ_{l>r}s_l²;
* writing a truncated update into a PEFT LoRA layer gives exactly that update, and restoring gives the old one;
* end to end on MiniLM-L6: the untruncated candidate measures the pilot's own loss, the advice is the cheapest
  measured candidate that keeps the target share, and ``--pilot-steps 0`` falls back to the K-FAC estimator.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hessrank.analysis.pilot import Truncation, Whitened, updates
from hessrank.engine.kfac import Eig, ModuleStats, damping_split


def _spd(n: int, gen: torch.Generator, cond: float = 30.0) -> torch.Tensor:
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    return (Q * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("r", [1, 2, 3])
def test_whitened_truncation_is_the_best_rank_r_approximation_in_the_kfac_metric(r):
    gen = torch.Generator().manual_seed(r)
    m, n = 6, 5
    A, G = _spd(n, gen), _spd(m, gen)
    dW = torch.randn(m, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, n, generator=gen, dtype=torch.float64)
    eig = Eig.of(ModuleStats(A, G, []))
    damping = 1e-3 * eig.lambda_max
    w = Whitened.of(eig, dW, damping)
    a, b = damping_split(eig, damping)
    H = torch.kron(G + b * torch.eye(m, dtype=torch.float64), A + a * torch.eye(n, dtype=torch.float64))

    def cost(X: torch.Tensor) -> torch.Tensor:
        d = (dW - X).reshape(-1)
        return 0.5 * d @ (H @ d)

    assert float(cost(torch.zeros_like(dW))) == pytest.approx(w.value, rel=1e-10)
    Xr = w.truncated(r)
    assert torch.linalg.matrix_rank(Xr).item() == r
    assert float(cost(Xr)) == pytest.approx(0.5 * float((w.S[r:] ** 2).sum()), rel=1e-8, abs=1e-14)
    assert w.energy_share(r) == pytest.approx(1 - float(cost(Xr)) / w.value, rel=1e-8)
    # no rank-r matrix does better (multi-start L-BFGS on X = UVᵀ)
    best = math.inf
    for _ in range(4):
        U = (0.1 * torch.randn(m, r, generator=gen, dtype=torch.float64)).requires_grad_(True)
        V = (0.1 * torch.randn(n, r, generator=gen, dtype=torch.float64)).requires_grad_(True)
        opt = torch.optim.LBFGS([U, V], max_iter=2000, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

        def closure(opt=opt, U=U, V=V):
            opt.zero_grad()
            loss = cost(U @ V.T)
            loss.backward()
            return loss

        opt.step(closure)
        best = min(best, float(cost(U @ V.T).detach()))
    assert float(cost(Xr)) <= best + 1e-9 * w.value
    assert float(cost(Xr)) == pytest.approx(best, rel=1e-5, abs=1e-12)
    # the plain (unwhitened) SVD truncation is no better
    P, s, Qh = torch.linalg.svd(dW)
    assert float(cost((P[:, :r] * s[:r]) @ Qh[:r])) >= float(cost(Xr)) - 1e-12


def test_truncation_writes_the_update_into_peft_lora_layers_and_restores_it():
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 6)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    pm = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    before = updates(pm, ["lin"])["lin"]
    assert before.shape == (6, 5) and torch.linalg.matrix_rank(before).item() == 4
    x = torch.randn(3, 5)
    y_before = pm(x).detach()
    L, R = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    target = L @ R
    tr = Truncation(pm, ["lin"])
    tr.set({"lin": (L, R)})
    assert torch.allclose(updates(pm, ["lin"])["lin"], target, atol=1e-5)
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    assert torch.allclose(pm(x).detach(), base + x @ target.float().T, atol=1e-5)
    tr.restore()
    assert torch.allclose(updates(pm, ["lin"])["lin"], before) and torch.allclose(pm(x).detach(), y_before)


@pytest.mark.slow
def test_pilot_advice_end_to_end_on_minilm(sentiment_tsv, tmp_path):
    """Real MiniLM-L6 (bundled) on a small sentiment set: the pilot learns, and the advice is what it measured."""
    from hessrank.advisor import RecommendSettings, recommend
    from hessrank.analysis import AnalysisConfig, analyze

    common = dict(
        model="minilm-l6",
        data=str(sentiment_tsv),
        task="seq-cls",
        modules="query,value",
        top_k=3,
        negative_k=0,
        slq_probes=1,
        slq_steps=4,
        batch_size=8,
        num_batches=2,
        max_length=16,
        probe_examples=64,
        kfac_batches=4,
        pilot_steps=30,
        pilot_rank=8,
        pilot_lr=3e-3,
        pilot_batch_size=8,
        pilot_eval_batches=2,
    )
    doc = analyze(AnalysisConfig(**common), tmp_path / "an", progress=False)
    pd = doc["pilot"]
    assert pd["settings"]["rank"] == 8 and set(pd["modules"]) == set(doc["modules"])
    el = pd["eval_loss"]
    full = next(u for u in pd["uniform"] if u["rank"] == 8)
    # the untruncated "truncation" is the pilot itself: same held-out loss, the whole decrease kept
    assert full["eval_loss"] == pytest.approx(el["pilot"], rel=1e-5)
    assert pd["train_loss"]["last"] < pd["train_loss"]["first"]
    for m in pd["modules"].values():
        shares = [m["energy_share"][k] for k in sorted(m["energy_share"], key=int)]
        assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    assert [a["share"] for a in pd["allocations"]] == sorted(a["share"] for a in pd["allocations"])
    assert doc["cost"]["seconds_units"] >= pd["seconds"] > 0

    rec = recommend(doc, RecommendSettings())
    assert rec["estimator"] == "pilot" and set(rec["estimators"]) == {"pilot", "kfac", "newton-topk"}
    target = rec["settings"]["target_share"]
    cands = [r for r in pd["uniform"] + pd["allocations"] if r["kept_share"] is not None]
    ok = [r for r in cands if r["kept_share"] >= target]
    ranks = {m: d["rank"] for m, d in rec["modules"].items()}
    # the untruncated candidate always keeps the target share, so one exists: the advice is the cheapest, as measured
    assert ok
    cheapest = min(r["params"] for r in ok)
    assert rec["estimators"]["pilot"]["lora_parameters"] == cheapest
    assert any(r["params"] == cheapest and r["ranks"] == ranks for r in ok)
    assert all(r >= 1 for r in ranks.values())
    assert rec["confidence"]["level"] in ("low", "normal") and "pilot" in rec["confidence"]["note"]
    assert any("pilot" in line for line in rec["explanation"])

    # no pilot (the default): the advice comes from the K-FAC curves, and asking for the pilot says why it cannot
    doc0 = analyze(
        AnalysisConfig(**{k: v for k, v in common.items() if k != "pilot_steps"}), tmp_path / "an0", progress=False
    )
    assert doc0["pilot"] is None
    assert recommend(doc0, RecommendSettings())["estimator"] == "kfac"
    from hessrank.errors import HessrankError

    with pytest.raises(HessrankError, match="no pilot run"):
        recommend(doc0, RecommendSettings(estimator="pilot"))


def test_the_report_draws_the_pilot_truncations_and_marks_the_advice():
    from hessrank.report import plots

    assert plots.pilot({"pilot": None}) is None
    uni = [{"rank": r, "params": 100 * r, "eval_loss": 0.4 - 0.01 * r} for r in (1, 2, 4)]
    doc = {
        "pilot": {
            "settings": {"rank": 4, "steps": 10},
            "uniform": uni,
            "allocations": [{"share": 0.9, "params": 250, "eval_loss": 0.37}],
            "eval_loss": {"rank0": 0.7, "pilot": 0.36},
        }
    }
    rec = {"estimator": "pilot", "estimators": {"pilot": {"lora_parameters": 250}}}
    fig = plots.pilot(doc, rec)
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [100, 200, 400]
    assert any("advice (250 parameters)" in t.get_text() for t in ax.get_legend().get_texts())
    assert plots.png(fig)[:4] == b"\x89PNG"
