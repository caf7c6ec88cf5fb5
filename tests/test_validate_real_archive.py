"""benchmarks/validate_real.py archive: the files the summary reads survive in reports/, weights do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("validate_real", ROOT / "benchmarks" / "validate_real.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_archive_keeps_summary_files_only_and_is_idempotent(tmp_path: Path) -> None:
    vr = _bench()
    case = tmp_path / "runs" / "minilm-sst2"
    files = {
        "analysis_wall.json": '{"seconds": 1}',
        "analysis/analysis.json": "{}",
        "analysis/recommendation.json": "{}",
        "validation/validation.json": "{}",
        "validation/runs/rank-1/metrics.json": "{}",
        "validation/runs/rank-1/adapter/adapter_model.safetensors": "weights",
        "validation/runs/rank-1/checkpoint/state.pt": "weights",
    }
    for rel, text in files.items():
        (case / rel).parent.mkdir(parents=True, exist_ok=True)
        (case / rel).write_text(text)
    dst = tmp_path / "reports"
    written = vr.archive(tmp_path / "runs", dst)
    kept = sorted(str(p.relative_to(dst / "minilm-sst2")) for p in written)
    assert kept == sorted(k for k in files if k.endswith(".json"))
    assert not list(dst.rglob("*.safetensors")) and not list(dst.rglob("*.pt"))
    assert vr.archive(tmp_path / "runs", dst) == []  # unchanged files are not rewritten
    (case / "validation/runs/rank-1/metrics.json").write_text('{"new": 1}')
    assert [p.name for p in vr.archive(tmp_path / "runs", dst)] == ["metrics.json"]
    assert (dst / "minilm-sst2/validation/runs/rank-1/metrics.json").read_text() == '{"new": 1}'


def test_advice_compares_ranks_format_and_parameters() -> None:
    """retime's check that a re-run analysis still gives the archived advice: an unselected module counts as
    rank 0, and a changed rank, format or parameter count makes the advice differ."""
    vr = _bench()

    def rec(q: int, v_selected: bool = True, fmt: str = "nf4", params: int = 100) -> dict:
        return {
            "modules": {"q": {"rank": q, "selected": True}, "v": {"rank": 2, "selected": v_selected}},
            "quantization": {"format": fmt},
            "trainable_parameters": params,
        }

    base = vr._advice(rec(1))
    assert base == {"ranks": {"q": 1, "v": 2}, "format": "nf4", "trainable_parameters": 100}
    assert vr._advice(rec(1)) == base
    assert vr._advice(rec(1, v_selected=False))["ranks"]["v"] == 0
    for other in (rec(2), rec(1, fmt="llm.int8"), rec(1, params=101), rec(1, v_selected=False)):
        assert vr._advice(other) != base


def test_cost_table_reads_a_retime_only_when_it_gave_the_archived_advice(tmp_path: Path) -> None:
    """The cost table shows a case's re-timed analysis (analysis_retime.json, written by retime) beside the one
    timed when it ran, and ignores a re-timing whose advice differed from the archived one."""
    import json

    vr = _bench()
    case = tmp_path / "minilm-sst2"
    (case / "validation").mkdir(parents=True)
    (case / "validation" / "validation.json").write_text(
        json.dumps({"cost": {"ladder_train_time": 1000.0, "analysis_seconds": 180.0}})
    )
    (case / "analysis_wall.json").write_text('{"seconds": 200.0}')
    row = next(r for r in vr.cost_table(tmp_path).splitlines() if r.startswith("| minilm-sst2 "))
    assert "| 20.0% |" in row and row.endswith("| - | - |")
    rt = {"seconds": 95.0, "commit": "abcdef0123", "advice_as_archived": True}
    (case / vr.RETIME_FILE).write_text(json.dumps(rt))
    row = next(r for r in vr.cost_table(tmp_path).splitlines() if r.startswith("| minilm-sst2 "))
    assert row.endswith("| 95 (abcdef0) | 9.5% |") and "| 20.0% |" in row
    (case / vr.RETIME_FILE).write_text(json.dumps({"seconds": 95.0, "commit": "abcdef0", "advice_as_archived": False}))
    assert vr._retimed(case) is None


def test_recipe_note_names_the_flags_an_archived_analysis_ran_with(tmp_path: Path) -> None:
    """A case whose archived analysis ran under other analyze flags than the recipe now prints (say an older --tol)
    gets a sentence naming each field with both values, and says whether a re-timing at the current recipe gave
    the archived advice; an analysis at the current recipe gets none."""
    import json

    from hessrank.cli import build_parser
    from hessrank.cli_analysis import analysis_config_from_args

    vr = _bench()
    case = tmp_path / "minilm-sst2"
    (case / "analysis").mkdir(parents=True)
    args = build_parser().parse_args(["analyze", *vr.CASES["minilm-sst2"]["analyze"], "--out", "x"])
    now = analysis_config_from_args(args).to_dict()
    cfg_file = case / "analysis" / "analysis_config.json"
    cfg_file.write_text(json.dumps({"config": now}))
    assert vr.recipe_differences("minilm-sst2", now) == {} and vr._recipe_note("minilm-sst2", case) is None
    old = {**now, "tol": now["tol"] / 2}
    del old["kfac_exact_check"]  # written before the field existed: compares at its default
    cfg_file.write_text(json.dumps({"config": old}))
    assert vr.recipe_differences("minilm-sst2", old) == {"tol": (now["tol"] / 2, now["tol"])}
    note = vr._recipe_note("minilm-sst2", case)
    assert f"tol {now['tol'] / 2!r} (now {now['tol']!r})" in note and "has not been compared" in note
    rt = {"seconds": 30.0, "commit": "abcdef0123", "advice_as_archived": True}
    (case / vr.RETIME_FILE).write_text(json.dumps(rt))
    assert "has not been compared" in vr._recipe_note("minilm-sst2", case)  # a re-timing of another recipe
    rt["analyze_args"] = vr.CASES["minilm-sst2"]["analyze"]
    (case / vr.RETIME_FILE).write_text(json.dumps(rt))
    assert "re-timed at abcdef0, gives the archived advice" in vr._recipe_note("minilm-sst2", case)


def test_extension_table_puts_each_extended_run_beside_the_training_it_replaced(tmp_path: Path) -> None:
    """A run extended under a decaying schedule (runs/<name>@<steps>) is listed with its shorter training: the
    selection-half loss at each one's best step, the reported loss, and which one the verdict used (validation.json);
    the closing sentence counts the extended runs whose shorter training was better on each half."""
    import json

    vr = _bench()

    def metrics(
        folder: str, steps: int, run: int, best: int, curve: dict[int, float], reported: float, rank: int = 8
    ) -> None:
        m = {
            "run_info": {"train_config": {"model": "m", "data": "d", "rank": rank, "steps": steps}},
            "train_info": {
                "steps": run,
                "best_step": best,
                "eval_curve": [{"step": s, "eval_loss": x} for s, x in curve.items()],
                "metrics": {"eval_loss": reported},
            },
        }
        (tmp_path / "runs" / folder).mkdir(parents=True)
        (tmp_path / "runs" / folder / "metrics.json").write_text(json.dumps(m))

    metrics("advice-s0", 100, 100, 100, {50: 0.9, 100: 0.8}, 0.81)  # never extended: not listed
    assert vr.extension_table(tmp_path) is None
    metrics("rank-8", 100, 100, 100, {50: 0.9, 100: 0.5}, 0.52)
    metrics("rank-8@200", 200, 150, 100, {50: 0.9, 100: 0.6, 150: 0.7}, 0.50)
    # which training the verdict used is validation.json's runs[].folder (the lower selection loss since session 20)
    row = {"run": "rank-8", "folder": "runs/rank-8", "eval_loss": 0.52}
    (tmp_path / "validation.json").write_text(json.dumps({"runs": [row]}))
    table = vr.extension_table(tmp_path)
    assert "| rank-8 | 100 | 100 | 100 | 0.5000 | 0.5200 | yes |" in table
    assert "| rank-8@200 | 200 | 150 | 100 | 0.6000 | 0.5000 | no |" in table
    assert "advice-s0" not in table
    assert "lower selection loss in 1 of 1 extended runs and the lower reported loss in 0 of 1" in table
    # the learning-rate grid (session 21): a run's other rates are its trainings too, in a column of their own
    metrics("rank-8~lr2x", 100, 100, 75, {50: 0.7, 75: 0.45, 100: 0.5}, 0.48)
    row = {"run": "rank-8", "folder": "runs/rank-8~lr2x", "eval_loss": 0.48}
    (tmp_path / "validation.json").write_text(json.dumps({"runs": [row]}))
    table = vr.extension_table(tmp_path)
    assert "| rank-8 | 1 | 100 | 100 | 100 | 0.5000 | 0.5200 | no |" in table
    assert "| rank-8~lr2x | 2 | 100 | 100 | 75 | 0.4500 | 0.4800 | yes |" in table
    # a resumed validation can train anew in a folder the stored verdict names (a rival seed's old training moved to
    # its extension's name): the row it used is the one with its loss, not whatever the folder holds now
    (tmp_path / "validation.json").write_text(json.dumps({"runs": [{**row, "eval_loss": 0.47}]}))
    assert "| rank-8~lr2x | 2 | 100 | 100 | 75 | 0.4500 | 0.4800 | no |" in vr.extension_table(tmp_path)
    assert "Another rate than the recipe's had the lower selection loss in 1 of 1 runs." in table
    # a folder of the same name trained under an earlier plan (GSM8K's eva@400: EVA at rank 4, while eva now trains
    # rank 5) is no training of the run: left out of its rows and of the counts, and named
    metrics("rank-8~lr2x@200", 200, 200, 200, {100: 0.3, 200: 0.2}, 0.25, rank=4)
    table = vr.extension_table(tmp_path)
    assert "| rank-8~lr2x@200 |" not in table and "earlier plan" in table and "rank-8~lr2x@200." in table
    assert "lower selection loss in 1 of 1 extended runs" in table
    # a longer folder after a training that had its plateau is no extension validate makes (GSM8K's rival-s2@400,
    # kept from session 19): listed, named, and not counted
    metrics("rank-16", 100, 100, 100, {50: 0.9, 100: 0.5}, 0.52, rank=16)
    metrics("rank-16@200", 200, 150, 100, {50: 0.9, 100: 0.45, 150: 0.7}, 0.50, rank=16)
    assert "lower selection loss in 1 of 2 extended runs" in vr.extension_table(tmp_path)
    m16 = tmp_path / "runs" / "rank-16" / "metrics.json"
    m16.write_text(m16.read_text().replace('"best_step": 100,', '"best_step": 100, "plateaued": true,'))
    table = vr.extension_table(tmp_path)
    assert "| rank-16@200 | 1 | 200 | 150 | 100 | 0.4500 | 0.5000 | no |" in table
    assert "not counted below): rank-16@200." in table and "lower selection loss in 1 of 1 extended runs" in table


def test_scoreboard_marks_competitors_with_fewer_parameters_and_counts_the_criterion(tmp_path: Path) -> None:
    """The scoreboard says when folk r = 16 or EVA trained fewer parameters than the advice (a tie then does not
    meet the advice issue's "at equal or fewer trainable parameters") and counts the cases where the advice beats or
    ties both at most at their size, from validation.json's competitor flags."""
    import json

    vr = _bench()

    def case(name: str, eva_params: int, eva_ok: bool) -> None:
        comp = [
            {"run": "folk-16", "winner": "tie", "minus_advice": -0.001, "trainable_params": 1000, "seeds": 3,
             "advice_ties_or_beats_at_fewer_params": True},
            {"run": "eva", "winner": "tie", "minus_advice": 0.002, "trainable_params": eva_params,
             "advice_ties_or_beats_at_fewer_params": eva_ok},
        ]  # fmt: skip
        v = {
            "verdict": "right",
            "advice": {"trainable_params": 100},
            "ladder": {"1": {"trainable_params": 50}, "2": {"trainable_params": 100}, "4": {"trainable_params": 200}},
            "competitors": comp,
            "cost": {"ladder_train_time": 1000.0, "analysis_seconds": 50.0},
        }
        (tmp_path / name / "validation").mkdir(parents=True)
        (tmp_path / name / "validation" / "validation.json").write_text(json.dumps(v))

    case("minilm-sst2", 120, True)
    case("minilm-agnews", 90, False)
    board = vr.scoreboard(tmp_path)
    sst2 = next(r for r in board.splitlines() if r.startswith("| minilm-sst2 "))
    agnews = next(r for r in board.splitlines() if r.startswith("| minilm-agnews "))
    assert "tie (+0.0020; 120 params) |" in sst2
    assert "tie (+0.0020; 90 params, fewer than the advice) |" in agnews
    assert "tie (-0.0010 (paired, 3 seeds); 1,000 params) |" in sst2  # folk-16 trained at three seeds
    assert "on 1 of the issue's 5 cases (2 finished) and on 1 of 2 finished cases in all" in board


def test_grid_note_names_a_case_validated_at_fewer_rates_than_validate_now_trains(tmp_path: Path) -> None:
    """A validation folder from before the learning-rate grid (no lr_grid stored: one rate) gets a sentence in the
    report; one validated at the current default grid gets none."""
    import json

    vr = _bench()
    assert vr._grid_note(tmp_path) is None
    (tmp_path / "validation").mkdir()
    cfg = tmp_path / "validation" / "validate_config.json"
    cfg.write_text(json.dumps({"config": {"steps": 100}}))
    assert "multiples [1.0] of the recipe's rate" in vr._grid_note(tmp_path)
    cfg.write_text(json.dumps({"config": {"steps": 100, "lr_grid": [1.0, 2.0]}}))
    assert vr._grid_note(tmp_path) is None
    # the verdict shown is validation.json's: a one-rate verdict being re-run with the grid still gets the sentence
    (tmp_path / "validation" / "validation.json").write_text(json.dumps({"config": {"steps": 100}}))
    assert "multiples [1.0]" in vr._grid_note(tmp_path)


def test_archive_removes_metrics_that_no_longer_describe_their_run(tmp_path: Path) -> None:
    """A run folder that now trains another configuration (moved to its extension's name, or retrained under
    --overwrite) and has not finished: its old archived metrics.json goes, the moved training is archived under its
    new name; a run still training what its archived metrics describe keeps them."""
    import json

    from hessrank.trainer.train import CONFIG_SCHEMA, TrainConfig

    vr = _bench()
    old, new = TrainConfig(model="m", data="d", steps=400), TrainConfig(model="m", data="d", steps=200)
    runs = tmp_path / "runs" / "smollm2-gsm8k" / "validation" / "runs"
    dst = tmp_path / "reports"

    def metrics(tc: TrainConfig) -> str:
        return json.dumps({"run_info": {"train_config": tc.to_dict()}, "train_info": {}})

    def config(tc: TrainConfig) -> str:
        return json.dumps({"schema": CONFIG_SCHEMA, "config": tc.to_dict()})

    for name in ("rival-s1", "rank-8"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(metrics(old))
        (runs / name / "train_config.json").write_text(config(old))
    vr.archive(tmp_path / "runs", dst)
    # validate moves rival-s1 to its extension's name and starts the planned 200-step training in rival-s1;
    # rank-8's training restarts (killed) under the configuration its archived metrics describe
    (runs / "rival-s1").rename(runs / "rival-s1@400")
    (runs / "rival-s1").mkdir()
    (runs / "rival-s1" / "train_config.json").write_text(config(new))
    (runs / "rank-8" / "metrics.json").unlink()
    vr.archive(tmp_path / "runs", dst)
    kept = dst / "smollm2-gsm8k" / "validation" / "runs"
    assert not (kept / "rival-s1" / "metrics.json").exists()
    assert json.loads((kept / "rival-s1" / "train_config.json").read_text())["config"]["steps"] == 200
    assert (kept / "rival-s1@400" / "metrics.json").read_text() == metrics(old)
    assert (kept / "rank-8" / "metrics.json").read_text() == metrics(old)
