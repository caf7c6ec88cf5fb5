"""The advisor: known-answer rank, budgets, quantization prediction, configs, memory forecast."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from hessrank.advisor.memory import Architecture, forecast, parse_bytes
from hessrank.advisor.rank import (
    ModuleCurve,
    curve_rank,
    lora_params,
    snap_to_grid,
    spectral_rank,
    water_fill,
)
from hessrank.analysis import AnalysisConfig, measure_scope
from hessrank.engine.curvature import HessianOperator
from hessrank.errors import HessrankError


class TeacherStudent(nn.Module):
    """y = W x; loss ½ E[Σᵢ dᵢ (Wx − y)ᵢ²] with y = W* x: H = D ⊗ C has rank-1 eigenvectors eᵢ cⱼᵀ."""

    def __init__(self, W0: torch.Tensor, d: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False).double()
        with torch.no_grad():
            self.proj.weight.copy_(W0)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def ts_loss(model: TeacherStudent, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    r = model(batch["x"]) - batch["y"]
    return 0.5 * (r**2 * model.d).sum(-1).mean()


@pytest.mark.parametrize("r0", [1, 2, 4])
def test_teacher_student_rank_is_found(r0):
    torch.manual_seed(0)
    out_f, in_f, n = 12, 10, 4000
    d = torch.linspace(3.0, 0.5, out_f, dtype=torch.float64)  # distinct output weights
    s = torch.linspace(4.0, 0.3, in_f, dtype=torch.float64)  # distinct input variances
    Q = torch.linalg.qr(torch.randn(in_f, in_f, dtype=torch.float64))[0]
    # the teacher differs from the student along the top-r0 curvature directions e_t c_tᵀ (distinct rows/cols)
    W0 = torch.randn(out_f, in_f, dtype=torch.float64) * 0.1
    delta = sum(torch.outer(torch.eye(out_f, dtype=torch.float64)[t], Q[:, t]) * (1.0 + t) for t in range(r0))
    Wstar = W0 + delta
    z = torch.randn(n, in_f, dtype=torch.float64)
    x = (z * s.sqrt()) @ Q.T  # covariance C = Q diag(s) Qᵀ (in expectation)
    y = x @ Wstar.T
    model = TeacherStudent(W0, d)
    batches = [{"x": x[i : i + 1000], "y": y[i : i + 1000]} for i in range(0, n, 1000)]
    op = HessianOperator(model, ts_loss, batches, params=["proj"], weights=[1000] * 4)
    # k = 40 of 120 directions covers the eigenpairs (t, t), t < 4, which the teacher uses
    cfg = AnalysisConfig(model="-", data="-", top_k=40, negative_k=0, slq_probes=0, tol=1e-8)
    res, _arrays = measure_scope(op, cfg, seed=0)
    per = res["newton"]["0.001"]["per_module"]["proj"]
    assert per["energy_rank"]["0.99"] == r0
    ranks, changes = per["curve"]["ranks"], per["curve"]["predicted_change"]
    assert curve_rank(ranks, changes, 0.99) == snap_to_grid(r0, out_f, in_f)
    # the quadratic model is exact here; the damping z = 1e-3·λ_max and the sampled covariance leave ~1%
    dv = delta.reshape(-1)
    hd = op.matvec(dv)
    assert res["newton"]["0.001"]["predicted_change_full"] == pytest.approx(-0.5 * float(dv @ hd), rel=3e-2)


def test_spectral_rank_parameter_counting():
    assert spectral_rank(0.5, 64, 64) == 1
    assert spectral_rank(127, 64, 64) == 1  # 1·(128−1) = 127 dof
    assert spectral_rank(128, 64, 64) == 2
    assert spectral_rank(10_000, 64, 64) == 64  # more than the matrix has: full rank
    assert spectral_rank(300, 64, 64) == 4  # r=3 gives 375 dof; snapped up to the grid


def test_water_fill_respects_budget_and_prefers_gain():
    a = ModuleCurve("a", 16, 16, (1, 2, 4, 8, 16), (1.0, 1.8, 2.5, 2.7, 2.8))
    b = ModuleCurve("b", 16, 16, (1, 2, 4, 8, 16), (0.1, 0.15, 0.2, 0.22, 0.23))
    cost1 = lora_params(1, 16, 16)
    r = water_fill([a, b], cost1)
    assert r == {"a": 1, "b": 0}
    for budget in (cost1 * 3, cost1 * 7, cost1 * 40):
        r = water_fill([a, b], budget)
        assert sum(lora_params(v, 16, 16) for v in r.values()) <= budget
    r = water_fill([a, b], cost1 * 100)
    assert r["a"] == 16 and r["b"] == 16
    with pytest.raises(ValueError):
        water_fill([a], -1)


def test_parse_bytes_and_errors():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("8GB") == 8 * 10**9
    for bad in ("6XB", "abc", "-1GiB", "0"):
        with pytest.raises(HessrankError):
            parse_bytes(bad)


def test_forecast_components():
    arch = Architecture(
        num_parameters=1000 + 2 * 64 * 64,
        linear_shapes={"a.q": (64, 64), "a.v": (64, 64)},
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        vocab_size=None,
    )
    f32 = forecast(arch, "none", {"a.q": 4}, {"a.q": (64, 64)}, 2, 16, device="cuda")
    assert f32.trainable_parameters == 4 * 128
    assert f32.lora_parameters == 4 * 128 * 4 and f32.optimizer == 4 * 128 * 8
    assert f32.base_weights == (1000 + 2 * 4096) * 4
    nf4 = forecast(arch, "nf4", {"a.q": 4}, {"a.q": (64, 64)}, 2, 16, device="cuda")
    assert nf4.base_weights == pytest.approx(1000 * 4 + 2 * 4096 * (0.5 + 4 / 64))
    skip = forecast(arch, "nf4", {"a.q": 4}, {"a.q": (64, 64)}, 2, 16, skip_modules=["v"], device="cuda")
    assert skip.base_weights > nf4.base_weights


# ---------------------------------------------------------------------------------------------------------
# The whole advisor on a real (tiny) analysis
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_analysis(tiny_llama_dir, tmp_path_factory):
    from hessrank.analysis import analyze

    d = tmp_path_factory.mktemp("an")
    rows = ["text\tlabel"] + [
        f"{'good great fine' if i % 2 else 'bad dull poor'} film number {i}\t{i % 2}" for i in range(120)
    ]
    data = d / "data.tsv"
    data.write_text("\n".join(rows) + "\n")
    cfg = AnalysisConfig(
        model=str(tiny_llama_dir),
        data=str(data),
        modules="q_proj,v_proj,o_proj",
        scopes=("joint",),
        top_k=6,
        negative_k=0,
        slq_probes=2,
        slq_steps=6,
        batch_size=8,
        num_batches=2,
        max_length=24,
        quant_formats=("int8", "llm.int8", "nf4", "nf4-dq", "fp4"),
        quant_sign_probes=6,
        quant_exact="yes",
        kfac_batches=8,
        data_options={"label_names": ("negative", "positive"), "template": "Review: {text}\nSentiment:"},
    )
    out = d / "run"
    analyze(cfg, out, progress=False)
    return out


@pytest.mark.slow
def test_recommend_writes_configs_peft_and_transformers_accept(tiny_analysis, tiny_llama_dir, tmp_path):
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hessrank.advisor import RecommendSettings, recommend, write_recommendation

    rec = recommend(tiny_analysis, RecommendSettings())
    files = write_recommendation(rec, tmp_path)
    doc = json.loads((tmp_path / "recommendation.json").read_text())
    assert doc["schema"] == "hessrank.recommendation/1"
    for d in doc["modules"].values():
        assert {"rank", "quantization"} <= set(d)
        assert set(d["quantization"]) == {"int8", "llm.int8", "nf4", "nf4-dq", "fp4"}
        for q in d["quantization"].values():
            assert {"predicted_loss_increase", "measured_loss_increase"} <= set(q)
    assert doc["quantization"]["format"] in ("none", "llm.int8", "nf4", "nf4-dq", "fp4")
    assert doc["explanation"] and doc["rules_of_thumb"]
    # no pilot run (opt-in): the default (auto) takes the K-FAC curves; the top-k estimator is reported beside it
    assert doc["estimator"] == "kfac" and set(doc["estimators"]) == {"kfac", "newton-topk"}
    assert doc["estimator_note"] is None
    conf = doc["confidence"]
    assert conf["level"] in ("low", "normal") and 0 < conf["resolved_share"] <= 1.5
    assert (conf["level"] == "low") == any(x.startswith("Low confidence") for x in doc["explanation"])
    # every analysed module keeps at least rank 1 by default (no module selection)
    assert all(d["rank"] >= 1 for d in doc["modules"].values()) and doc["selection"]["dropped"] == []
    # the top-k estimator is still available, with its own confidence
    alt = recommend(tiny_analysis, RecommendSettings(estimator="newton-topk"))
    assert alt["estimator"] == "newton-topk" and set(alt["confidence"]["top_k_ratio"]) == {"joint"}
    from hessrank.advisor.recommend import explain

    forced = {**rec, "confidence": {**rec["confidence"], "level": "low", "note": "λ_k/λ_1 = 0.5 > 0.1: flat"}}
    assert "Low confidence in the ranks: λ_k/λ_1 = 0.5 > 0.1: flat." in explain(forced, RecommendSettings())
    assert files["peft"] == "lora_config.json"

    lcfg = LoraConfig(**json.loads((tmp_path / "lora_config.json").read_text()))
    BitsAndBytesConfig(**json.loads((tmp_path / "bnb_config.json").read_text()))
    ax = yaml.safe_load((tmp_path / "axolotl.yaml").read_text())
    assert ax["lora_r"] == doc["global_rank"] and "lora_target_modules" in ax
    assert lcfg.use_rslora and ax["peft_use_rslora"] is True and doc["lora"]["use_rslora"] is True
    lf = yaml.safe_load((tmp_path / "llamafactory.yaml").read_text())
    assert lf["finetuning_type"] == "lora" and lf["lora_rank"] == doc["global_rank"] and lf["use_rslora"] is True

    # get_peft_model builds exactly the advised shapes
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pm = get_peft_model(model, lcfg)
    named = dict(pm.named_modules())
    for m, d in doc["modules"].items():
        key = f"base_model.model.{m}"
        if d["rank"] == 0:
            assert not hasattr(named[key], "lora_A")
            continue
        o, i = d["shape"]
        assert tuple(named[key].lora_A["default"].weight.shape) == (d["rank"], i)
        assert tuple(named[key].lora_B["default"].weight.shape) == (o, d["rank"])
        # rank-stable scaling α/√r (rsLoRA), the same α on every module
        assert named[key].scaling["default"] == pytest.approx(d["alpha"] / d["rank"] ** 0.5)
        assert d["alpha"] == doc["lora"]["lora_alpha"]


@pytest.mark.slow
def test_quantization_prediction_tracks_measurement(tiny_analysis):
    doc = json.loads((tiny_analysis / "analysis.json").read_text())
    q = doc["quantization"]
    mods = list(q["formats"]["nf4"]["modules"])
    # coarser formats perturb more: int8 far less than NF4, NF4 less than FP4
    rel = {f: np.mean([q["formats"][f]["modules"][m]["delta_rel_norm"] for m in mods]) for f in q["formats"]}
    assert rel["int8"] < rel["nf4"] < rel["fp4"]
    # in sample (where the Taylor model is evaluated) predicted and measured increases agree module by module
    for f in ("int8", "nf4", "fp4"):
        for m in mods:
            d = q["formats"][f]["modules"][m]
            assert d["predicted_loss_increase"] == pytest.approx(d["measured_in_sample"], rel=0.25, abs=2e-6), (f, m)
        assert q["formats"][f]["spearman"]["predicted_vs_in_sample"] > 0.8


def test_random_sign_block_estimates_are_unbiased():
    from hessrank.engine.quantization import block_quadratic_signs

    g = torch.Generator().manual_seed(0)
    n, blocks = 30, {"a": (0, 10), "b": (10, 18), "c": (18, 30)}
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = M @ M.T / n + torch.randn(n, n, generator=g, dtype=torch.float64) * 0.3
    H = (H + H.T) / 2
    deltas = {k: torch.randn(b - a, generator=g, dtype=torch.float64) for k, (a, b) in blocks.items()}
    exact = {k: float(deltas[k] @ H[a:b, a:b] @ deltas[k]) for k, (a, b) in blocks.items()}
    errs = []
    for probes in (4, 64, 1024):
        est = block_quadratic_signs(lambda v: H @ v, blocks, deltas, n, probes, torch.Generator().manual_seed(1))
        errs.append(max(abs(est[k] - exact[k]) for k in blocks))
    assert errs[2] < errs[0] and errs[2] < 0.1 * max(abs(x) for x in exact.values())


def test_per_module_quantization_evaluations_only_where_a_skip_list_can_help():
    from hessrank.advisor.quant import format_options
    from hessrank.engine.quantization import skip_list_can_help

    limit = 0.02
    assert not skip_list_can_help(0.01, 0.01, limit)  # within the tolerance: nothing to skip
    assert skip_list_can_help(0.05, 0.04, limit)  # the targets cost enough to bring it back under
    assert not skip_list_can_help(0.30, 0.06, limit)  # the other layers alone exceed the tolerance

    def quant(measured: bool) -> dict:
        per = {m: {"measured_loss_increase": v if measured else None} for m, v in zip("abcd", (0.03, 0.001, 0, 0))}
        fmt = {
            "whole_model": {"measured_loss_increase": 0.045},
            "targets": {"predicted_loss_increase": 0.04, "measured_loss_increase": 0.04},
            "modules": per,
        }
        return {"base_eval_loss": 1.0, "tolerance": 0.02, "formats": {"nf4": fmt}}

    def nf4(measured: bool):
        opts = format_options(quant(measured), 0.02, lambda fmt, skips: 100 + len(skips))
        return next(o for o in opts if o.format == "nf4")

    got = nf4(True)  # measured: keep the most sensitive module unquantized, which reaches the tolerance
    assert got.skip_modules == ["a"] and got.acceptable and got.loss_increase == pytest.approx(0.015)
    got = nf4(False)  # not measured: no skip list, and the note says how to get one
    assert got.skip_modules == [] and not got.acceptable
    assert any("--quant-module-evals all" in n for n in got.notes)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::scipy.stats.ConstantInputWarning")
def test_quantization_defaults_cost_one_hvp_per_format_and_take_the_quadratic_from_kfac():
    from fixtures import tiny_bert
    from hessrank import HessianOperator
    from hessrank.engine.quantization import measure_quantization

    model, batches, loss_fn = tiny_bert(dtype=torch.float32)
    formats = ["int8", "nf4"]
    runs = {}
    for name, kw in {
        "default": {},
        "signs": {"sign_probes": 2, "module_evals": "all"},
        "none": {"module_evals": "none"},
    }.items():
        op = HessianOperator(model, loss_fn, batches[:1], params=["query", "value"])
        doc, _ = measure_quantization(model, loss_fn, "seq-cls", op, batches[1:], formats, **kw)
        runs[name] = (doc, op.num_matvecs)
        op.release()
    doc, hvps = runs["default"]
    assert hvps == len(formats)  # the targets-together quadratic only
    assert doc["trace_source"] == "kfac" and doc["module_evals"] == "auto"
    for f in formats:
        rows = doc["formats"][f]["modules"].values()
        assert {r["quadratic_source"] for r in rows} == {"kfac"}
        assert all(r["quadratic_signs"] is None for r in rows)
        for r in rows:
            assert r["predicted_loss_increase"] == pytest.approx(r["gradient_term"] + 0.5 * r["quadratic_kfac"])
        # auto measures the modules one by one exactly when a skip list could help at the tolerance
        fd = doc["formats"][f]
        can = fd["whole_model"]["measured_loss_increase"] > 0.02 * doc["base_eval_loss"] and (
            fd["whole_model"]["measured_loss_increase"] - max(0.0, fd["targets"]["measured_loss_increase"])
            <= 0.02 * doc["base_eval_loss"]
        )
        assert fd["modules_measured"] == can
        assert all((r["measured_loss_increase"] is not None) == can for r in rows)
    doc, hvps = runs["signs"]
    assert hvps == len(formats) * 3 + 2  # + 2 sign probes per format, + 2 Hutchinson probes for the traces
    assert doc["trace_source"] == "hutchinson"
    rows = doc["formats"]["nf4"]["modules"].values()
    assert {r["quadratic_source"] for r in rows} == {"signs"}
    assert all(isinstance(r["measured_loss_increase"], float) for r in rows)
    assert set(doc["formats"]["nf4"]["spearman"]) >= {"predicted", "quadratic_signs", "quadratic_kfac", "hawq_proxy"}
    doc, _ = runs["none"]
    assert all(r["measured_loss_increase"] is None for f in formats for r in doc["formats"][f]["modules"].values())
    assert doc["formats"]["nf4"]["spearman"]["predicted"] is None


@pytest.mark.slow
def test_budgets_are_respected_and_bad_budgets_fail(tiny_analysis):
    from hessrank.advisor import RecommendSettings, recommend

    free = recommend(tiny_analysis, RecommendSettings())
    budget = max(1, free["trainable_parameters"] // 3)
    smallest = min(lora_params(1, *d["shape"]) for d in free["modules"].values())
    budget = max(budget, smallest)
    rec = recommend(tiny_analysis, RecommendSettings(param_budget=budget))
    used = sum(lora_params(d["rank"], *d["shape"]) for d in rec["modules"].values())
    assert used <= budget and rec["budget"]
    mem_budget = rec["memory"]["total"] + 10 * 2**20
    rec2 = recommend(tiny_analysis, RecommendSettings(memory_budget=mem_budget))
    assert rec2["memory"]["total"] <= mem_budget
    with pytest.raises(HessrankError, match="below the smallest rank-1 adapter"):
        recommend(tiny_analysis, RecommendSettings(param_budget=1))
    with pytest.raises(HessrankError, match="memory budget"):
        recommend(tiny_analysis, RecommendSettings(memory_budget=10 * 2**20))
    with pytest.raises(HessrankError, match="tolerance"):
        recommend(tiny_analysis, RecommendSettings(tolerance=0))
    with pytest.raises(HessrankError, match="either"):
        recommend(tiny_analysis, RecommendSettings(param_budget=10**6, memory_budget=2**30))


def test_rank_pattern_keys_match_only_their_module():
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.self_attn.q_proj" for i in (1, 10, 11)]
    pattern = {re.escape(names[0]): 4}
    assert get_pattern_key(pattern.keys(), names[0]) == re.escape(names[0])
    assert get_pattern_key(pattern.keys(), names[1]) == names[1]  # layers.1 does not match layers.10


def test_joint_allocation_counts_shared_directions_once():
    """One eigen-direction split evenly over two modules: the separable sum double-counts it, the joint model
    does not, and one module alone already buys most of the decrease."""
    from hessrank.advisor.rank import JointCurve, ScopeModel, allocate, predicted_decrease

    lam, g = 2.0, -1.0  # full step a = -g/lam = 0.5, full decrease g²/(2λ) = 0.25
    half = 0.25  # each module's part of the step's coordinate
    scope = {"joint": ScopeModel((lam,), (g,))}
    curves = [JointCurve(n, 8, 8, "joint", (1, 8), ((half,), (half,))) for n in ("a", "b")]
    both = predicted_decrease(curves, scope, {"a": 1, "b": 1})
    one = predicted_decrease(curves, scope, {"a": 1, "b": 0})
    assert both == pytest.approx(0.25)
    assert one == pytest.approx(-(g * half + 0.5 * lam * half**2))  # 0.1875: 75% of the full decrease
    separable = 2 * one
    assert separable > both  # what a per-module sum would claim
    ranks, spent, share = allocate(curves, scope, share=0.7)
    assert sorted(ranks.values()) == [0, 1] and share == pytest.approx(0.75)
    ranks, _, share = allocate(curves, scope, share=0.9)
    assert ranks == {"a": 1, "b": 1} and share == pytest.approx(1.0)
    ranks, spent, _ = allocate(curves, scope, param_budget=lora_params(1, 8, 8))
    assert spent == lora_params(1, 8, 8) and sum(1 for r in ranks.values() if r) == 1


def _spectrum_doc(eigs_by_scope: dict[str, tuple[str, list[str], list[float]]]) -> dict:
    scopes = [
        {"name": n, "kind": kind, "modules": mods, "repeats": [{"eigenvalues": eigs}]}
        for n, (kind, mods, eigs) in eigs_by_scope.items()
    ]
    return {"scopes": scopes, "config": {"top_k": 4}}


def test_top_k_confidence_flags_a_flat_top_k_spectrum():
    from hessrank.advisor.recommend import FLAT_TOP_K, top_k_confidence

    decayed = top_k_confidence(_spectrum_doc({"joint": ("joint", ["a", "b"], [100.0, 20.0, 5.0, 2.0])}))
    assert decayed["level"] == "normal"
    assert decayed["top_k_ratio"] == {"joint": pytest.approx(0.02)}

    flat = top_k_confidence(_spectrum_doc({"joint": ("joint", ["a", "b"], [43.0, 30.0, 25.0, 18.3])}))
    assert flat["level"] == "low" and flat["threshold"] == FLAT_TOP_K
    assert flat["top_k_ratio"]["joint"] == pytest.approx(18.3 / 43.0)
    assert "top-4" in flat["note"] and "lower bounds" in flat["note"]

    # per-module scopes take precedence over the joint one for their module; the worst ratio decides
    mixed = top_k_confidence(
        _spectrum_doc(
            {
                "joint": ("joint", ["a", "b"], [100.0, 1.0]),
                "a": ("module", ["a"], [10.0, 5.0]),
            }
        )
    )
    assert mixed["top_k_ratio"] == {"a": pytest.approx(0.5), "joint": pytest.approx(0.01)}
    assert mixed["level"] == "low"

    # a scope no larger than k has its whole spectrum: no alarm however slowly it decays
    whole = _spectrum_doc({"joint": ("joint", ["a"], [2.0, 1.5, 1.0, 0.9])})
    whole["scopes"][0]["repeats"][0]["num_params"] = 4
    assert top_k_confidence(whole)["level"] == "normal"

    # a spectrum with no positive eigenvalue gives no ratio and no alarm
    neg = top_k_confidence(_spectrum_doc({"joint": ("joint", ["a"], [-1.0, -2.0])}))
    assert neg["level"] == "normal" and neg["top_k_ratio"] == {}
