"""Loading with ``device_map`` (accelerate placement), and the scaling benchmark's arithmetic.

* ``load_model(..., device_map="auto")`` on a CPU-only machine puts every layer on the CPU; the Hessian of the
  loaded model equals that of the normal load (same gradient, loss and HVP; multi-GPU placement is untested:
  docs/scaling.md);
* the 7B/70B scope sizes of ``benchmarks/bench_scaling.py`` equal the parameter counts of the same architectures
  built by transformers (on the meta device, so nothing is allocated);
* ``bench_scaling.py --models tiny --repeats 1`` prints its table and writes the markdown.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "benchmarks" / "bench_scaling.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scaling"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _operator(lm):
    import hessrank

    tok = lm.tokenizer
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return hessrank.HessianOperator(lm.model, hessrank.causal_lm_loss, [batch], params=["q_proj", "v_proj"])


def test_device_map_auto_on_cpu_gives_the_normal_hessian(tiny_llama_dir):
    pytest.importorskip("accelerate")
    from hessrank.models import load_model

    plain = load_model(tiny_llama_dir, "causal-lm")
    mapped = load_model(tiny_llama_dir, "causal-lm", device_map="auto")
    assert "device_map" not in plain.info
    placement = mapped.info["device_map"]
    assert placement and set(placement.values()) == {"cpu"}, placement  # no GPU: every layer on the CPU
    assert all(p.device.type == "cpu" for p in mapped.model.parameters())
    a, b = _operator(plain), _operator(mapped)
    assert a.n == b.n and a.param_names == b.param_names
    v = torch.randn(a.n, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(b.gradient().numpy(), a.gradient().numpy(), rtol=1e-5, atol=1e-7)
    assert b.loss() == pytest.approx(a.loss(), rel=1e-6)
    np.testing.assert_allclose(b.matvec(v).numpy(), a.matvec(v).numpy(), rtol=1e-4, atol=1e-6)


def test_analyze_device_map_option_gives_the_same_analysis(tiny_llama_dir, sentiment_tsv, tmp_path):
    """``hessrank analyze --device-map`` (a keyword, or a JSON file of {module: device}) loads through accelerate,
    records the placement in analysis.json, and measures the spectrum of the normal load."""
    pytest.importorskip("accelerate")
    import json

    from hessrank.cli import main

    argv = [
        "analyze",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(sentiment_tsv),
        "--modules",
        "q_proj",
        "--scope",
        "joint",
        "--top-k",
        "2",
        "--negative-k",
        "0",
        "--slq-probes",
        "0",
        "--batch-size",
        "2",
        "--num-batches",
        "1",
        "--max-length",
        "16",
        "--device",
        "cpu",
        "--quiet",
    ]
    (tmp_path / "map.json").write_text(json.dumps({"": "cpu"}))
    docs = {}
    for name, extra in [
        ("plain", []),
        ("auto", ["--device-map", "auto"]),
        ("file", ["--device-map", str(tmp_path / "map.json")]),
    ]:
        assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0
        docs[name] = json.loads((tmp_path / name / "analysis.json").read_text())
    assert "device_map" not in docs["plain"]["model"]
    for name in ("auto", "file"):
        assert set(docs[name]["model"]["device_map"].values()) == {"cpu"}
        assert docs[name]["config"]["device_map"] in ("auto", str(tmp_path / "map.json"))
        ev = docs[name]["scopes"][-1]["repeats"][0]["eigenvalues"]
        np.testing.assert_allclose(ev, docs["plain"]["scopes"][-1]["repeats"][0]["eigenvalues"], rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama-7b-gqa8", "llama-70b"])
def test_projected_scope_sizes_match_transformers(arch):
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _bench()
    a = bench.ARCHS[arch]
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert bench.total_params(a) == total
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    qv = sum(m.weight.numel() for n, m in lin.items() if n.endswith(("q_proj", "v_proj")))
    assert bench.scope_params(a, "q_proj,v_proj") == qv
    assert bench.scope_params(a, "all-linear") == sum(m.weight.numel() for m in lin.values())


def test_basis_vectors_follow_the_analysis_plan():
    from hessrank.engine.lanczos import default_ncv

    bench = _bench()
    assert bench.basis_vectors(10_000, 20) == default_ncv(10_000, 20) + 1 == 51
    assert bench.basis_vectors(600_000_000, 20) == 42  # a 2 GiB cap is exceeded: ncv falls to 2k + 1


@pytest.mark.slow
def test_bench_scaling_tiny_runs(tmp_path):
    out = tmp_path / "scaling.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    args = ["--models", "tiny", "--repeats", "1", "--no-torchrun", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "| tiny-llama |" in text and "HVP/grad" in text and "llama-70b" in text
