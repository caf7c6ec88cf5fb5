"""Data-parallel HVPs on torch.distributed (Gloo on the CPU).

* the sharded operator (2 processes spawned here) gives the one-process gradient, loss and HVPs, and each rank
  holds a different share of the batches;
* ``hessrank analyze`` under ``torchrun --nproc_per_node 2`` gives the top eigenvalues of the one-process run
  (relative difference <= 1e-5) and records the world size and each rank's batches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hessrank.distributed import assignment, shard

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_shard_is_a_partition():
    for n, w in [(4, 2), (5, 2), (7, 3), (3, 3)]:
        parts = [shard(n, w, r) for r in range(w)]
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert assignment(5, 2) == {"0": [0, 1, 2], "1": [3, 4]}
    from hessrank.errors import HessrankError

    with pytest.raises(HessrankError, match="cannot be shared by 3 processes"):
        shard(2, 3, 0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: the tiny MLP's operator over its share of 5 batches; writes what it computed."""
    os.environ.update(
        {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures import tiny_mlp
    from hessrank.distributed import from_env
    from hessrank.engine.curvature import HessianOperator

    ctx = from_env(torch.device("cpu"))
    assert ctx is not None and ctx.backend == "gloo"
    model, batches, loss_fn = tiny_mlp(n=20)  # 5 batches of 4 rows, float64
    batches[-1] = {k: v[:2] for k, v in batches[-1].items()}  # unequal weights: the last batch has 2 rows
    op = HessianOperator(model, loss_fn, batches, params=None, dist=ctx)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = {
        "ids": op.batch_ids,
        "grad": op.gradient().tolist(),
        "loss": op.loss(),
        "hv": op.matvec(v).tolist(),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_sharded_operator_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures import tiny_mlp
    from hessrank.engine.curvature import HessianOperator

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["ids"] == [0, 1, 2] and got[1]["ids"] == [3, 4]  # different shares, covering all batches
    model, batches, loss_fn = tiny_mlp(n=20)
    batches[-1] = {k: v[:2] for k, v in batches[-1].items()}
    op = HessianOperator(model, loss_fn, batches, params=None)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = {"grad": op.gradient().numpy(), "loss": op.loss(), "hv": op.matvec(v).numpy()}
    for g in got:
        np.testing.assert_allclose(g["grad"], ref["grad"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g["hv"], ref["hv"], rtol=1e-12, atol=1e-14)
        assert g["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    # all-reduced results are bitwise identical on both ranks (what keeps the replicated Lanczos in step)
    assert got[0]["hv"] == got[1]["hv"] and got[0]["grad"] == got[1]["grad"]


def _argv(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "analyze",
        "--model",
        str(model),
        "--data",
        str(data),
        "--modules",
        "q_proj,v_proj",
        "--scope",
        "joint,module",
        "--top-k",
        "3",
        "--negative-k",
        "1",
        "--tol",
        "1e-6",
        "--slq-probes",
        "1",
        "--slq-steps",
        "4",
        "--batch-size",
        "4",
        "--num-batches",
        "4",
        "--max-length",
        "24",
        "--kfac-batches",
        "4",
        "--label-names",
        "negative,positive",
        "--template",
        "Review: {text}\\nSentiment:",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_analyze_under_torchrun_matches_one_process(tiny_llama_dir, sentiment_tsv, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run(
        [sys.executable, "-m", "hessrank", *_argv(tiny_llama_dir, sentiment_tsv, one)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r1.returncode == 0, r1.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r2 = subprocess.run(
        [*launch, "-m", "hessrank", *_argv(tiny_llama_dir, sentiment_tsv, two)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("wrote ") == 1  # only rank 0 reports
    d1 = json.loads((one / "analysis.json").read_text())
    d2 = json.loads((two / "analysis.json").read_text())
    assert d1["distributed"] == {"world_size": 1, "backend": None, "batches_by_rank": {"0": [0, 1, 2, 3]}}
    assert d2["distributed"] == {"world_size": 2, "backend": "gloo", "batches_by_rank": {"0": [0, 1], "1": [2, 3]}}
    assert [s["name"] for s in d1["scopes"]] == [s["name"] for s in d2["scopes"]]
    worst = 0.0
    for s1, s2 in zip(d1["scopes"], d2["scopes"]):
        a, b = s1["repeats"][0], s2["repeats"][0]
        assert b["batches_by_rank"] == d2["distributed"]["batches_by_rank"]  # what each rank's operator held
        assert a["converged"] and b["converged"]
        e1, e2 = np.array(a["eigenvalues"]), np.array(b["eigenvalues"])
        worst = max(worst, float(np.max(np.abs(e1 - e2) / np.abs(e1))))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    print(f"largest relative eigenvalue difference, 2 processes vs 1: {worst:.2e}")
    assert worst <= 1e-5, worst
    # rank 0 alone wrote the folder: the same files as the one-process run
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if not p.name.startswith("."))
    assert names(one) == names(two)


def _train_argv(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--task",
        "causal-lm",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "24",
        "--lr",
        "1e-2",
        "--target-modules",
        "q_proj,v_proj",
        "--label-names",
        "negative,positive",
        "--template",
        "Review: {text}\\nSentiment:",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_train_under_torchrun_two_processes(tiny_llama_dir, sentiment_tsv, tmp_path):
    """DDP over Gloo: the global batch of 8 is split 4 + 4, so rank 0 trains on about half the tokens of a
    one-process run of the same recipe; rank 0 alone writes the run folder."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run(
        [sys.executable, "-m", "hessrank", *_train_argv(tiny_llama_dir, sentiment_tsv, one)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r2 = subprocess.run(
        [*launch, "-m", "hessrank", *_train_argv(tiny_llama_dir, sentiment_tsv, two)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("wrote ") == 1  # only rank 0 reports
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1["meta_info"]["system_info"]["world_size"] == 1
    assert m2["meta_info"]["system_info"]["world_size"] == 2
    t1, t2 = m1["train_info"], m2["train_info"]
    assert t1["steps"] == t2["steps"] == 6 and len(t2["eval_curve"]) == 2
    assert 0.35 * t1["train_tokens"] < t2["train_tokens"] < 0.65 * t1["train_tokens"]
    assert np.isfinite(t2["metrics"]["eval_loss"]) and (two / "adapter" / "adapter_config.json").is_file()
    # the same recipe on other batches: a held-out loss in the same range as the one-process run's
    assert t2["metrics"]["eval_loss"] == pytest.approx(t1["metrics"]["eval_loss"], rel=0.5)
    # the run folder is the one-process one, except that a checkpoint holds each rank's RNG state (for resume)
    rng = lambda n: n.replace("rng_state_0.pth", "rng_state.pth")
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if not p.name.startswith("."))
    assert [rng(n) for n in names(two) if "rng_state_1" not in n] == names(one)
    assert (two / "checkpoints" / "checkpoint-6" / "rng_state_1.pth").is_file()


@pytest.mark.slow
def test_train_under_accelerate_launch_two_processes(tiny_llama_dir, sentiment_tsv, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` runs the same DDP training as torchrun on a CPU-only
    machine: accelerate's multi-process launcher is torchrun underneath and hessrank picks Gloo without CUDA (its
    ``--cpu`` flag starts one process unless MPI is set up). Two processes, the global batch split between them,
    rank 0 alone writes."""
    pytest.importorskip("accelerate")
    out = tmp_path / "acc"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hessrank",
    ]
    # no user accelerate config may change the launch: point its config home at an empty folder
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [*launch, *_train_argv(tiny_llama_dir, sentiment_tsv, out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports
    m = json.loads((out / "metrics.json").read_text())
    assert m["meta_info"]["system_info"]["world_size"] == 2
    t = m["train_info"]
    assert t["steps"] == 6 and len(t["eval_curve"]) == 2 and np.isfinite(t["metrics"]["eval_loss"])
    assert (out / "checkpoints" / "checkpoint-6" / "rng_state_1.pth").is_file()  # each rank's RNG state
    assert (out / "adapter" / "adapter_config.json").is_file()
