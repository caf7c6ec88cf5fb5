"""Validation backends: ``--backend ray`` trains the independent runs as Ray tasks on a local 2-worker cluster
started here, and writes the validation the local backend writes (same runs, losses and verdict)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hessrank.errors import HessrankError
from hessrank.trainer.backends import LocalBackend, RayBackend, make_backend

OPTS = {"label_names": ["negative", "positive"], "template": "Review: {text}\nSentiment:"}

#: wall-clock times and the peak memory of the process that trained: the only fields two validations of the same
#: runs may differ in
TIMES = {
    "created",
    "created_at",
    "seconds",
    "train_time",
    "advice_train_time",
    "ladder_train_time",
    "total_time",
    "peak_memory_bytes",
}


def same(a, b, path="doc"):
    """Equal documents up to wall-clock fields (floats to 1e-6 relative)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            if k not in TIMES:
                same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_make_backend():
    assert isinstance(make_backend("local"), LocalBackend) and make_backend("local").prefetch([]) == {}
    rb = make_backend("ray", address=None, num_cpus=2, num_gpus=None)
    assert isinstance(rb, RayBackend) and (rb.address, rb.num_cpus, rb.num_gpus) == (None, 2, 0.0)
    with pytest.raises(HessrankError, match="not one of local, ray"):
        make_backend("dask")


@pytest.fixture()
def tiny_rec(tiny_llama_dir, tmp_path):
    from hessrank.advisor import recommend, write_recommendation
    from hessrank.analysis import AnalysisConfig, analyze

    rows = ["text\tlabel"] + [
        f"{'good great fine' if i % 2 else 'bad dull poor'} film number {i}\t{i % 2}" for i in range(160)
    ]
    data = tmp_path / "tiny.tsv"
    data.write_text("\n".join(rows) + "\n")
    an = tmp_path / "an"
    cfg = AnalysisConfig(
        model=str(tiny_llama_dir),
        data=str(data),
        modules="q_proj,v_proj",
        top_k=4,
        negative_k=0,
        slq_probes=0,
        batch_size=8,
        num_batches=1,
        max_length=24,
        kfac_batches=8,
        data_options=OPTS,
    )
    analyze(cfg, an, progress=False)
    write_recommendation(recommend(an), an)
    return an / "recommendation.json"


@pytest.mark.slow
def test_ray_backend_writes_the_local_validation(tiny_rec, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hessrank[ray]')")
    import hessrank.trainer.train as train_mod
    from hessrank.trainer.validate import ValidateConfig, validate

    cfg = ValidateConfig(
        recommendation=str(tiny_rec),
        steps=4,
        eval_every=2,
        batch_size=8,
        lr=1e-2,
        seeds=(0, 1),
        multipliers=(0.5, 1.0, 2.0),
        competitors=("folk",),
        max_extensions=1,
        max_train=120,
        max_eval=40,
        device="cpu",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers (OMP_NUM_THREADS=1): the same arithmetic, the same losses
    try:
        local = validate(cfg, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        # every run must be trained by a Ray task: training in this process fails
        def no_local_training(*a, **kw):
            raise AssertionError("a run was trained in the validating process, not in a Ray task")

        monkeypatch.setattr(train_mod, "_fit", no_local_training)
        out = tmp_path / "ray"
        doc = validate(cfg, out, progress=False, backend=RayBackend(num_cpus=1))
        assert doc["errors"] == {} and len(doc["runs"]) == len(local["runs"])
        read = lambda d: json.loads((d / "validation.json").read_text())
        same(read(tmp_path / "local"), read(out))
        # resume: a second validation with the Ray backend finds every run finished and trains nothing
        stamps = {p: p.stat().st_mtime_ns for p in Path(out, "runs").glob("*/metrics.json")}
        again = validate(cfg, out, progress=False, backend=RayBackend(num_cpus=1))
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
        same(doc, again)
    finally:
        ray.shutdown()
