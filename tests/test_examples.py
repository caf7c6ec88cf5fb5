"""The scripts in ``examples/`` run as a user runs them (a subprocess, bundled real models, 1 thread) and do what
their docstrings say; the README's Python block is ``examples/01_analyze_recommend.py``, character for character."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
VALUE_MODULES = [f"bert.encoder.layer.{i}.attention.self.value" for i in range(6)]


def run_example(name: str, *args: Path, cwd: Path) -> str:
    """Run ``examples/<name>`` with this interpreter, offline and on one thread, from ``cwd``; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def code_body(path: Path) -> str:
    """The script after its module docstring (leading blank lines dropped)."""
    text = path.read_text()
    doc = ast.parse(text).body[0]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), f"{path.name} has no docstring"
    return "".join(text.splitlines(keepends=True)[doc.end_lineno :]).lstrip("\n")


def test_every_example_has_a_measured_docstring_and_an_output_argument():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert [p.name for p in scripts] == [
        "01_analyze_recommend.py",
        "02_eigenvalues_of_a_module.py",
        "03_peft_from_recommendation.py",
    ]
    for p in scripts:
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and re.search(r"Measured\b.*?\d+ s wall", doc, flags=re.S), (
            f"{p.name}: the docstring states no measured time"
        )
        assert "sys.argv[1]" in p.read_text() and "tempfile.mkdtemp" in p.read_text(), p.name


def test_readme_python_block_is_example_01():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, flags=re.S | re.M)
    assert blocks, "README.md has no ```python block"
    assert "examples/01_analyze_recommend.py" in readme
    assert blocks[0] == code_body(EXAMPLES / "01_analyze_recommend.py")


@pytest.fixture(scope="module")
def example_01(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("example01") / "run"
    stdout = run_example("01_analyze_recommend.py", out, cwd=out.parent)
    return out, stdout


@pytest.mark.slow
def test_example_01_analysis_and_recommendation(example_01):
    out, stdout = example_01
    for f in ("analysis.json", "analysis.npz", "recommendation.json", "lora_config.json", "bnb_config.json"):
        assert (out / f).is_file(), f
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["model"]["name"] == "minilm-l6" and doc["model"]["task"] == "seq-cls"
    assert doc["analysis_point"]["kind"] == "pretrained body + fitted head"
    assert doc["analysis_point"]["probe"]["loss_after"] < doc["analysis_point"]["probe"]["loss_before"]
    assert sorted(doc["modules"]) == VALUE_MODULES
    assert all(m["shape"] == [384, 384] for m in doc["modules"].values())
    (joint,) = doc["scopes"]
    assert joint["name"] == "joint" and sorted(joint["modules"]) == VALUE_MODULES
    ev = joint["summary"]["eigenvalues_mean"]
    assert len(ev) == 4 and all(math.isfinite(x) for x in ev)
    assert ev == sorted(ev, reverse=True) and ev[-1] > 0 and joint["summary"]["converged"]
    assert joint["summary"]["num_params"] == 6 * 384 * 384

    rec = json.loads((out / "recommendation.json").read_text())
    ranks = {m: d["rank"] for m, d in rec["modules"].items()}
    assert sorted(ranks) == VALUE_MODULES and all(isinstance(r, int) and r >= 1 for r in ranks.values())
    assert rec["estimator"] == "kfac" and rec["quantization"]["format"] == "none"
    lora = json.loads((out / "lora_config.json").read_text())
    assert lora["target_modules"] == VALUE_MODULES and lora["modules_to_save"] == ["classifier"]
    assert lora["r"] == rec["global_rank"]
    # what the script printed is what it wrote
    assert str(ranks) in stdout and f"{ev[0]:.4g}" in stdout


@pytest.mark.slow
def test_example_02_eigenvalues_of_one_module(tmp_path):
    out = tmp_path / "run"
    stdout = run_example("02_eigenvalues_of_a_module.py", out, cwd=tmp_path)
    r = json.loads((out / "eigenvalues.json").read_text())
    assert r["module"] == "bert.encoder.layer.2.attention.self.value"
    assert r["num_params"] == 384 * 384 and r["examples"] == 16
    ev = r["eigenvalues"]
    assert len(ev) == 8 and all(math.isfinite(x) for x in ev) and ev == sorted(ev, reverse=True)
    assert ev[-1] > 0 and r["converged"]
    # the top pair, checked by one more HVP outside the solver
    assert r["top_residual"] < 1e-2 * ev[0]
    assert r["most_negative"] < 0  # indefinite at the pretrained point
    assert r["probe"]["loss_after"] < r["probe"]["loss_before"]
    for w in r["slq_weights"]:
        assert math.isclose(sum(w), 1.0, rel_tol=1e-6)
    assert max(max(n) for n in r["slq_nodes"]) <= ev[0] * (1 + 1e-3)
    eff = r["effective_dimension"]
    assert math.isclose(eff["lambda_max"], ev[0])
    assert 1 <= eff["n_eff_relative_topk"]["0.01"] <= 8
    assert eff["n_eff_relative_slq"]["0.01"] >= eff["n_eff_relative_topk"]["0.01"] - 1
    assert r["hvps"] > r["lanczos_matvecs"] > 8
    assert "top eigenvalues:" in stdout


@pytest.mark.slow
def test_example_03_peft_model_from_a_budgeted_recommendation(example_01, tmp_path):
    analysis, _ = example_01
    out = tmp_path / "run"
    run_example("03_peft_from_recommendation.py", out, analysis, cwd=tmp_path)
    c = json.loads((out / "peft_check.json").read_text())
    assert 0 < c["lora_parameters"] <= c["param_budget"]
    adapted = {m: r for m, r in c["advised_ranks"].items() if r > 0}
    assert adapted and c["peft_ranks"] == adapted  # PEFT built every advised rank from lora_config.json
    assert c["trainable_parameters"] == c["advised_trainable_parameters"]
    assert c["held_out_loss_after"] < c["held_out_loss_before"]
    rec = json.loads((out / "recommendation" / "recommendation.json").read_text())
    assert rec["settings"]["param_budget"] == c["param_budget"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and sorted(saved["target_modules"]) == sorted(adapted)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the analysis folder was only read
    assert not (analysis / "recommendation").exists()


@pytest.mark.slow
def test_package_docstring_three_calls_run_as_written():
    """The snippet in ``hessrank.__doc__`` (what ``help(hessrank)`` shows) runs and gives sorted, finite eigenvalues."""
    import hessrank

    block = hessrank.__doc__.split("::", 1)[1].split("\n\n")[1]
    code = "\n".join(line[4:] for line in block.splitlines())
    scope: dict = {"hessrank": hessrank}
    exec(code, scope)
    ev = scope["res"].eigenvalues
    assert len(ev) == 8 and all(math.isfinite(x) for x in ev) and list(ev) == sorted(ev, reverse=True)
