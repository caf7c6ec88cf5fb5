"""Warm start (:mod:`hessrank.warmstart`): adapters start at the SVD truncation of a pilot's update."""

from __future__ import annotations

import json

import pytest
import torch

from hessrank.errors import HessrankError
from hessrank.train import TrainConfig
from hessrank.warmstart import PilotUpdate, apply, balanced_factors


def test_balanced_factors_are_the_eckart_young_truncation_split_evenly():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 9, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(delta)
    for r, scaling in ((1, 8.0), (3, 8 / 3**0.5), (5, 0.25)):
        B, A = balanced_factors(delta, r, scaling)
        assert B.shape == (7, r) and A.shape == (r, 9)
        err = torch.linalg.matrix_norm(delta - scaling * B @ A)
        # Eckart–Young: the best rank-r error is the norm of the dropped singular values
        assert float(err) == pytest.approx(float(s[r:].norm()), rel=1e-10, abs=1e-12)
        # S^½ on both sides: the factors carry equal energy
        assert float(B.norm()) == pytest.approx(float(A.norm()), rel=1e-10)
    with pytest.raises(HessrankError, match="exceeds"):
        balanced_factors(delta, 8, 1.0)


def test_apply_sets_every_adapter_to_its_truncation_and_loads_the_head(tiny_bert_dir):
    from peft import LoraConfig, get_peft_model

    from hessrank.models import load_model, resolve_targets

    lm = load_model(str(tiny_bert_dir), "seq-cls", num_labels=2)
    targets = resolve_targets(lm.model, "query,value")
    shapes = {t: lm.model.get_submodule(t).weight.shape for t in targets}
    g = torch.Generator().manual_seed(1)
    deltas = {t: torch.randn(*shapes[t], generator=g, dtype=torch.float64) * 1e-2 for t in targets}
    head_name = "classifier"
    head_state = {k: torch.full_like(v, 0.5) for k, v in lm.model.get_submodule(head_name).state_dict().items()}
    ranks = {t: (1 if i % 2 else 3) for i, t in enumerate(targets)}
    conf = LoraConfig(
        r=2,
        lora_alpha=8,
        use_rslora=True,
        target_modules=targets,
        rank_pattern={f"^{t.replace('.', '[.]')}$": r for t, r in ranks.items()},
        modules_to_save=[head_name],
        task_type="SEQ_CLS",
    )
    pm = get_peft_model(lm.model, conf)
    set_ranks = apply(pm, targets, PilotUpdate(deltas, {head_name: head_state}, {}))
    assert set_ranks == ranks
    named = dict(pm.base_model.model.named_modules())
    for t in targets:
        layer = named[t]
        got = float(layer.scaling["default"]) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        U, S, Vh = torch.linalg.svd(deltas[t], full_matrices=False)
        r = ranks[t]
        want = (U[:, :r] * S[:r]) @ Vh[:r]
        assert torch.allclose(got.double(), want, atol=1e-6), t
    head = named[head_name].modules_to_save["default"]
    assert all(torch.equal(v, head_state[k]) for k, v in head.state_dict().items())


def test_warm_start_config_errors_name_the_field():
    with pytest.raises(HessrankError, match="warm-start-rank 4 is below the largest adapter rank 8"):
        TrainConfig(model="m", data="d", rank=8, warm_start_steps=10, warm_start_rank=4)
    with pytest.raises(HessrankError, match="warm-start-rank 16 is below the largest adapter rank 32"):
        TrainConfig(model="m", data="d", rank=4, rank_pattern={"a": 32}, warm_start_steps=10, warm_start_rank=16)
    with pytest.raises(HessrankError, match="applies to methods lora and rslora, not 'ia3'"):
        TrainConfig(model="m", data="d", method="ia3", warm_start_steps=10)
    with pytest.raises(HessrankError, match="warm-start-steps must be >= 0"):
        TrainConfig(model="m", data="d", warm_start_steps=-1)


@pytest.mark.slow
def test_train_with_a_warm_start_records_its_pilot_and_starts_below_the_cold_loss(tmp_path, tiny_bert_dir):
    """A warm-started run trains through the CLI, records its pilot in metrics.json, and its first evaluation is
    below a cold run's (the pilot already lowered the loss)."""
    from hessrank.cli import main

    rows = ["text\tlabel"] + [f"{'good great' if i % 2 else 'bad dull'} film {i}\t{i % 2}" for i in range(200)]
    (tmp_path / "d.tsv").write_text("\n".join(rows) + "\n")
    common = ["train", "--model", str(tiny_bert_dir), "--data", str(tmp_path / "d.tsv"), "--task", "seq-cls"]
    common += ["--target-modules", "query,value", "--rank", "2", "--steps", "4", "--eval-every", "1", "--lr", "1e-2"]
    common += ["--batch-size", "8", "--max-length", "16", "--max-eval", "32", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "cold")]) == 0
    assert main([*common, "--warm-start-steps", "30", "--warm-start-rank", "8", "--out", str(tmp_path / "warm")]) == 0
    cold = json.loads((tmp_path / "cold" / "metrics.json").read_text())["train_info"]
    warm = json.loads((tmp_path / "warm" / "metrics.json").read_text())["train_info"]
    assert "warm_start" not in cold
    ws = warm["warm_start"]
    assert ws["steps"] == 30 and ws["rank"] == 8 and ws["ranks"] == [2]
    assert ws["train_loss_last"] < ws["train_loss_first"]
    assert warm["eval_curve"][0]["eval_loss"] < cold["eval_curve"][0]["eval_loss"]
