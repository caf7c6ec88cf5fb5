"""The advice's allocation rules on synthetic curves with known answers: floors, budgets, the share target, module
selection, and the paired verdict of the validation."""

from __future__ import annotations

import pytest

from hessrank.advisor.rank import ModuleCurve, lora_params, separable_allocation, uniform_curve
from hessrank.advisor.recommend import RecommendSettings, select_modules


def _curve(name: str, gains: list[float], ranks=(1, 2, 4, 8), shape=(16, 16)) -> ModuleCurve:
    return ModuleCurve(name, shape[0], shape[1], tuple(ranks), tuple(gains))


def test_every_module_keeps_rank_one_and_rank_goes_where_gain_per_parameter_is_largest():
    curves = [_curve("a", [1.0, 1.9, 3.0, 3.2]), _curve("b", [0.01, 0.011, 0.012, 0.012]), _curve("c", [0.0] * 4)]
    ranks, params, reached = separable_allocation(curves, share=0.9, floor={c.name: 1 for c in curves})
    assert ranks["b"] == 1 and ranks["c"] == 1  # kept at the floor: nothing worth more
    assert ranks["a"] == 4  # 3.01 of 3.212 needs a's rank 4 (1.91 at rank 2 is not 90%)
    assert params == sum(lora_params(r, 16, 16) for r in ranks.values())
    assert reached == pytest.approx((3.0 + 0.01 + 0.0) / 3.212)
    # without floors a module that buys nothing gets no adapter
    free, _, _ = separable_allocation(curves, share=0.9)
    assert free["c"] == 0


def test_budget_is_respected_and_floors_yield_to_a_budget_they_exceed():
    curves = [_curve(n, [1.0, 1.5, 1.8, 1.9]) for n in "abcd"]
    one = lora_params(1, 16, 16)
    ranks, params, _ = separable_allocation(curves, param_budget=6 * one, floor={c.name: 1 for c in curves})
    assert params <= 6 * one and all(r >= 1 for r in ranks.values()) and sum(ranks.values()) == 6
    tight, p2, _ = separable_allocation(curves, param_budget=2 * one, floor={c.name: 1 for c in curves})
    assert p2 <= 2 * one and sorted(tight.values()) == [0, 0, 1, 1]


def test_uniform_curve_sums_modules_at_each_rank():
    curves = [_curve("a", [1.0, 2.0, 2.5, 2.6]), _curve("b", [0.5, 0.6, 0.6, 0.6])]
    assert uniform_curve(curves, [1, 2, 8]) == [1.5, 2.6, 3.2]


def test_share_target_defaults_to_one_minus_tolerance():
    assert RecommendSettings().target_share == pytest.approx(0.98)
    assert RecommendSettings(tolerance=0.05).target_share == pytest.approx(0.95)
    assert RecommendSettings(share=0.9).target_share == 0.9


def test_module_selection_needs_both_held_out_halves_to_agree():
    info = {
        "big": {"peak": 1.0, "gain_halves": [1.1, 0.9]},
        "tiny": {"peak": 0.001, "gain_halves": [0.002, 0.0]},
        "noisy": {"peak": 0.001, "gain_halves": [0.5, 0.0]},  # one half says it matters
    }
    assert select_modules(info, 0.0) == {m: None for m in info}  # default: nothing dropped
    out = select_modules(info, 0.05)
    assert out["big"] is None and out["noisy"] is None
    assert out["tiny"] is not None and "both held-out halves" in out["tiny"]


def _metrics(loss: float, seed: int, params: int = 100) -> dict:
    return {
        "train_info": {"metrics": {"eval_loss": loss}, "num_trainable_params": params, "eval_curve": [], "steps": 1},
        "run_info": {"train_config": {"seed": seed}},
    }


@pytest.mark.parametrize(
    "rival,expect",
    [
        ([0.90, 0.91, 0.89], "too small"),  # better at every seed by ~0.1: far beyond 2% and the paired noise
        ([0.995, 1.002, 0.998], "right"),  # within 2% of the loss
        ([0.90, 1.10, 0.95], "right"),  # better on average, but the paired spread is wide: inside 2·se
    ],
)
def test_paired_verdict(rival, expect):
    from hessrank.trainer.validate import ValidateConfig, _verdict, paired_differences

    adv = {0: 1.0, 1: 1.0, 2: 1.0}
    p = paired_differences(dict(enumerate(rival)), adv)
    assert p["n"] == 3 and p["mean"] == pytest.approx(sum(rival) / 3 - 1.0)
    ladder = {1: _metrics(1.0, 0, 100), 4: _metrics(rival[0], 0, 400)}
    v = _verdict(ValidateConfig(recommendation="x"), adv, 100, ladder, p)
    assert v["verdict"] == expect, v["why"]
    assert v["band"] >= 0.02 * min(1.0, 1.0 + p["mean"]) - 1e-12


def test_too_large_when_within_the_band_at_more_than_twice_the_knee():
    from hessrank.trainer.validate import ValidateConfig, _verdict, paired_differences

    adv = {0: 1.0, 1: 1.0, 2: 1.0}
    p = paired_differences({0: 1.0, 1: 1.0, 2: 1.0}, adv)
    ladder = {1: _metrics(1.0, 0, 100), 4: _metrics(0.999, 0, 400)}
    v = _verdict(ValidateConfig(recommendation="x"), adv, 1000, ladder, p)
    assert v["verdict"] == "too large" and v["knee"] == 1


def test_a_smaller_rung_that_beats_the_advice_makes_it_beaten_not_too_small():
    from hessrank.trainer.validate import ValidateConfig, _verdict, paired_differences

    adv = {0: 1.0, 1: 1.0, 2: 1.0}
    p = paired_differences({0: 0.9, 1: 0.91, 2: 0.89}, adv)
    ladder = {1: _metrics(0.9, 0, 100), 8: _metrics(1.0, 0, 800)}
    assert _verdict(ValidateConfig(recommendation="x"), adv, 400, ladder, p, rival_params=100)["verdict"] == "beaten"
    assert _verdict(ValidateConfig(recommendation="x"), adv, 400, ladder, p, rival_params=800)["verdict"] == "too small"


def test_knee_sentence_names_the_rank_or_says_there_is_none():
    from hessrank.trainer.validate import knee_sentence

    assert knee_sentence({"knee_rank": 8, "band": 0.0123, "knee_reference_loss": 0.5}) == (
        "Knee rank r* = 8 (smallest ladder rank within 0.0123 of the run best on the selection half at the first "
        "seed (reported loss 0.5000))."
    )
    # a validation written before session 24 measured the knee from the lowest reported loss and says so
    assert knee_sentence({"knee_rank": 8, "band": 0.0123}) == (
        "Knee rank r* = 8 (smallest ladder rank within 0.0123 of the best run at the first seed)."
    )
    none = knee_sentence({"knee_rank": None, "band": 0.0038})
    assert "None" not in none and "no ladder rank is within 0.0038" in none


def _selected(reported: float, selection: float, params: int) -> dict:
    """A run whose best checkpoint (step 100) has ``selection`` on the selection half and ``reported`` on the rest."""
    m = _metrics(reported, 0, params)
    m["train_info"].update(eval_curve=[{"step": 100, "eval_loss": selection}], best_step=100)
    return m


def test_knee_is_measured_from_the_run_best_on_the_selection_half_not_the_lowest_reported_loss():
    from hessrank.trainer.validate import ValidateConfig, _verdict, knee_reference, paired_differences

    adv = {0: 1.0, 1: 1.0, 2: 1.0}
    p = paired_differences({0: 1.0, 1: 1.0, 2: 1.0}, adv)  # no paired spread: the band is 2% of 1.0
    # rank 2 has the lowest reported loss only by luck of the reported half; rank 1 is best where runs are chosen
    ladder = {1: _selected(1.00, 0.95, 100), 2: _selected(0.97, 0.99, 200)}
    advice = _selected(1.0, 0.98, 300)
    assert knee_reference([*ladder.values(), advice]) == 1.00
    v = _verdict(ValidateConfig(recommendation="x"), adv, 300, ladder, p, advice_first=advice)
    # from the lowest reported loss (0.97) rank 1 (1.00) is outside the band: knee 2 (200 params) and "right"
    assert v["knee"] == 1 and v["knee_params"] == 100 and v["knee_ref"] == 1.00
    assert v["verdict"] == "too large", v["why"]
    # the advice best on the selection half and every rung beyond the band of its reported loss: no knee
    best = _selected(0.90, 0.90, 300)
    v = _verdict(ValidateConfig(recommendation="x"), {0: 0.9, 1: 0.9, 2: 0.9}, 300, ladder, p, advice_first=best)
    assert v["knee"] is None and v["verdict"] == "right"
