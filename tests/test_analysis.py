from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hessrank.analysis import AnalysisConfig, analyze, load_analysis, newton_module_quantities
from hessrank.errors import HessrankError


def small_cfg(model, data, **kw):
    base = dict(
        model=str(model),
        data=str(data),
        modules="q_proj,v_proj",
        scopes=("module", "group", "joint"),
        top_k=3,
        negative_k=1,
        slq_probes=2,
        slq_steps=6,
        trace_matvecs=6,
        batch_size=4,
        num_batches=2,
        max_length=24,
        repeats=2,
        seed=0,
        device="cpu",
        data_options={"label_names": ("negative", "positive"), "template": "Review: {text}\nSentiment:"},
    )
    base.update(kw)
    return AnalysisConfig(**base)


@pytest.mark.slow
def test_analyze_causal_end_to_end_and_resume(tiny_llama_dir, sentiment_tsv, tmp_path):
    out = tmp_path / "an"
    cfg = small_cfg(tiny_llama_dir, sentiment_tsv, kfac_exact_check=True)
    doc = analyze(cfg, out, progress=False)
    assert doc["schema"] == "hessrank.analysis/1"
    names = [s["name"] for s in doc["scopes"]]
    assert names[:4] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert "group:q_proj" in names and "joint" in names
    assert doc["analysis_point"]["kind"] == "pretrained"
    joint = next(s for s in doc["scopes"] if s["name"] == "joint")
    assert len(joint["repeats"]) == 2
    r0 = joint["repeats"][0]
    assert len(r0["eigenvalues"]) == 3 and r0["eigenvalues"] == sorted(r0["eigenvalues"], reverse=True)
    # mass of each eigenvector splits over the 4 modules and sums to 1
    mass = np.array(list(r0["module_mass"].values()))
    np.testing.assert_allclose(mass.sum(axis=0), 1.0, atol=1e-5)
    assert set(r0["newton"]) == {"0.1", "0.01", "0.001"}
    per = r0["newton"]["0.01"]["per_module"]["model.layers.0.self_attn.q_proj"]
    assert per["curve"]["ranks"][-1] == 16  # q_proj is 16 x 16: full rank closes the curve
    # the joint top eigenvalue dominates every module's (Cauchy interlacing: a principal submatrix)
    mods = [s for s in doc["scopes"] if s["kind"] == "module"]
    for s in mods:
        assert s["repeats"][0]["eigenvalues"][0] <= r0["eigenvalues"][0] * (1 + 1e-3)
    assert (out / "analysis.npz").is_file()
    # the whole-module K-FAC curves: every target module, each damping, calibrated per scope on its Lanczos pairs
    kf = doc["kfac"]
    assert set(kf["per_z"]) == {"0.1", "0.01", "0.001"} and kf["groups"] == 4
    curves = kf["per_z"]["0.01"]["modules"]
    assert set(curves) == set(doc["modules"])
    for c in curves.values():
        assert c["ranks"][-1] == min(doc["modules"][next(iter(curves))]["shape"]) or c["ranks"][-1] <= 16
        assert all(b >= a - 1e-15 for a, b in zip(c["decrease"], c["decrease"][1:]))  # running maximum
        assert c["peak"] == pytest.approx(max(0.0, max(c["decrease"])))
    cal = kf["calibration"]
    assert {"joint", "group:q_proj", "model.layers.0.self_attn.q_proj"} <= set(cal)
    assert cal["joint"]["scale"] > 0 and len(cal["joint"]["ratios"]) == 3
    # the exact check along the K-FAC steps (opt-in): one HVP per rank; K-FAC curvature is positive, the exact one
    # need not be (a random tiny model's Hessian is indefinite), and the certified decrease exists only where it is
    chk = cal["joint"]["exact_check"]
    assert [c["rank"] for c in chk] == [1, 8] and all(c["dKd"] > 0 for c in chk)
    for c in chk:
        if c["dHd"] > 0 and c["g_dot_d"] < 0:
            assert c["exact_decrease"] == pytest.approx(0.5 * c["g_dot_d"] ** 2 / c["dHd"])
        else:
            assert c["exact_decrease"] is None
    assert doc["cost"]["seconds_units"] >= kf["seconds"]
    # summary statistics over the repeats
    assert joint["summary"]["eigenvalues_std"][0] >= 0

    # resume: drop one unit and the final files -> only that unit is recomputed, results identical
    before = json.loads((out / "analysis.json").read_text())
    units = sorted((out / "units").glob("*.json"))
    keep_mtime = {u.name: u.stat().st_mtime_ns for u in units}
    victim = out / "units" / "r1__joint.json"
    victim.unlink()
    (out / "analysis.json").unlink()
    doc2 = analyze(cfg, out, progress=False)
    for u in sorted((out / "units").glob("*.json")):
        if u.name != "r1__joint.json":
            assert u.stat().st_mtime_ns == keep_mtime[u.name]
    strip = lambda d: [[{k: v for k, v in r.items() if "seconds" not in k} for r in s["repeats"]] for s in d["scopes"]]
    assert strip(doc2) == strip(before)
    assert load_analysis(out)["config"] == cfg.to_dict()

    # a different configuration in the same folder is refused
    with pytest.raises(HessrankError, match=r"different configuration.*top_k"):
        analyze(small_cfg(tiny_llama_dir, sentiment_tsv, top_k=4, kfac_exact_check=True), out, progress=False)


@pytest.mark.slow
def test_analyze_seq_cls_fits_head_first(tiny_bert_dir, sentiment_tsv, tmp_path):
    cfg = small_cfg(
        tiny_bert_dir,
        sentiment_tsv,
        task="seq-cls",
        modules="query,value",
        scopes=("joint",),
        repeats=1,
        data_options={},
        probe_examples=64,
        negative_k=0,
        slq_probes=1,
        trace_matvecs=0,
    )
    doc = analyze(cfg, tmp_path / "an", progress=False)
    point = doc["analysis_point"]
    assert point["kind"] == "pretrained body + fitted head"
    assert point["probe"]["loss_after"] < point["probe"]["loss_before"]
    # the K-FAC exact check is opt-in: by default every HVP is the top-k Lanczos run's (SLQ's one probe shares it)
    r0 = doc["scopes"][0]["repeats"][0]
    assert r0["kfac_exact_check"] is None and doc["kfac"]["calibration"]["joint"]["exact_check"] is None
    assert r0["kfac_rayleigh"] and doc["kfac"]["calibration"]["joint"]["scale"] > 0
    assert r0["matvecs"] == r0["lanczos_matvecs"]


def test_config_validation():
    with pytest.raises(HessrankError, match="scope"):
        AnalysisConfig(model="m", data="d", scopes=("layer",))
    with pytest.raises(HessrankError, match="top-k must be at least 1"):
        AnalysisConfig(model="m", data="d", top_k=0)
    with pytest.raises(HessrankError, match="trace-matvecs"):
        AnalysisConfig(model="m", data="d", trace_matvecs=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_newton_quantities_recover_low_rank_step(dtype):
    """With H = I on the top-k subspace spanned by rank-1 matrices, the Newton step's rank is the number of
    distinct rank-1 directions the gradient excites, and the rank-r curve reaches the full decrease at r; float32
    eigenvectors (a float32 model's Lanczos basis) give the same within float32's rounding."""
    torch.manual_seed(0)
    o, i, k = 12, 10, 4
    U = torch.linalg.qr(torch.randn(o, o, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(i, i, dtype=torch.float64))[0]
    vecs = torch.stack([torch.outer(U[:, j], W[:, j]).reshape(-1) for j in range(k)])  # orthonormal rank-1
    lam = np.array([4.0, 3.0, 2.0, 1.0])
    g = np.array([1.0, -2.0, 0.0, 0.0])  # only two directions have gradient
    out, arrays = newton_module_quantities(lam, g, {"m": vecs.to(dtype)}, {"m": (o, i)}, z_family=(1e-6,))
    per = out["1e-06"]["per_module"]["m"]
    assert per["energy_rank"]["0.99"] == 2
    curve = dict(zip(per["curve"]["ranks"], per["curve"]["predicted_change"]))
    full = out["1e-06"]["predicted_change_full"]
    assert full == pytest.approx(-(1 / 8 + 4 / 6), rel=1e-5)  # -Σ g²/(2λ)
    assert curve[2] == pytest.approx(full, rel=1e-5) and curve[1] > full
    s = arrays["newton/1e-06/m/singular_values"]
    assert s[2] < (1e-6 if dtype == torch.float64 else 1e-5) * s[0]
