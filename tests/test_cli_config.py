"""``--config FILE``: one YAML file for every subcommand; flags override it; bad keys and values are named."""

from __future__ import annotations

import pytest

from hessrank.cli import _apply_config_and_check, build_parser
from hessrank.errors import HessrankError

CONFIG = """
model: minilm-l6
data: sst2
seed: 3
analyze:
  modules: [query, value]
  top_k: 6
  quant-formats: llm.int8,nf4
  keep_graph: "false"
recommend:
  tolerance: 0.05
  estimator: newton-topk
train:
  epochs: 2
  rank_pattern: {bert.encoder.layer.5.attention.self.value: 4}
validate:
  seeds: 2
  competitors: folk,eva
"""


def parse(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_config_and_check(parser, args, argv)
    return args


@pytest.fixture()
def cfg(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(CONFIG)
    return str(f)


def test_shared_keys_and_sections_fill_options_and_flags_win(cfg):
    a = parse(["analyze", "--config", cfg, "--out", "X", "--top-k", "9"])
    assert (a.model, a.data, a.seed, a.modules, a.quant_formats, a.keep_graph) == (
        "minilm-l6",
        "sst2",
        3,
        "query,value",
        "llm.int8,nf4",
        "false",
    )
    assert a.top_k == 9  # the flag overrides the file's 6
    assert parse(["analyze", "--config", cfg, "--out", "X"]).top_k == 6
    r = parse(["recommend", "DIR", "--config", cfg])
    assert (r.tolerance, r.estimator) == (0.05, "newton-topk")
    t = parse(["train", "--config", cfg, "--out", "R"])
    assert t.epochs == 2.0 and t.seed == 3 and t.model == "minilm-l6"
    assert t.config_extra == {"rank_pattern": {"bert.encoder.layer.5.attention.self.value": 4}}
    v = parse(["validate", "DIR", "--config", cfg, "--out", "V"])
    assert (v.seeds, v.competitors) == (2, "folk,eva")


@pytest.mark.parametrize(
    "text,argv,needle",
    [
        ("mdoel: x\n", ["analyze", "--out", "X"], "unknown key 'mdoel'"),
        (
            "analyze:\n  topk: 3\n",
            ["analyze", "--model", "m", "--data", "d", "--out", "X"],
            "'analyze' has no option 'topk'; allowed:",
        ),
        (
            "analyze:\n  keep_graph: maybe\n",
            ["analyze", "--model", "m", "--data", "d", "--out", "X"],
            "key 'analyze.keep_graph' is 'maybe'; allowed: auto, true, false",
        ),
        (
            "analyze:\n  top_k: many\n",
            ["analyze", "--model", "m", "--data", "d", "--out", "X"],
            "key 'analyze.top_k' must be int",
        ),
        ("recommend:\n  estimator: magic\n", ["recommend", "DIR"], "allowed: auto, pilot, kfac, newton-topk"),
        ("train:\n  gradient_checkpointing: 3\n", ["train", "--out", "R"], "must be true or false"),
        ("analyze: [1, 2]\n", ["analyze", "--model", "m", "--data", "d", "--out", "X"], "must be a mapping"),
        ("- a\n- b\n", ["analyze", "--out", "X"], "expected a mapping"),
        ("data: d\n", ["analyze", "--out", "X"], "--model is required"),
    ],
)
def test_bad_config_is_named(tmp_path, text, argv, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(HessrankError) as e:
        parse([*argv, "--config", str(f)])
    msg = str(e.value)
    assert needle in msg, msg
    if not needle.startswith("--"):  # a problem in the file names the file
        assert str(f) in msg, msg


def test_every_subcommand_has_config_and_an_example(capsys):
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sp in subs.items():
        assert "examples:" in (sp.epilog or ""), name
        if name != "models":
            assert any("--config" in a.option_strings for a in sp._actions), name


def test_cli_defaults_are_the_config_dataclass_defaults():
    """analyze and validate take their defaults from AnalysisConfig / ValidateConfig (one place to change)."""
    import argparse
    import dataclasses

    from hessrank.analysis import AnalysisConfig
    from hessrank.cli import build_parser
    from hessrank.cli_config import field_default
    from hessrank.trainer.validate import ValidateConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, cls in (("analyze", AnalysisConfig), ("validate", ValidateConfig)):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        checked = 0
        for a in sub.choices[cmd]._actions:
            f = fields.get(a.dest)
            if f is None or not a.option_strings:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue
            want = len(field_default(cls, "seeds")) if a.dest == "seeds" else field_default(cls, a.dest)
            assert a.default == want, f"{cmd} --{a.dest.replace('_', '-')}: {a.default!r} != {cls.__name__} {want!r}"
            checked += 1
        assert checked >= (30 if cmd == "analyze" else 14), (cmd, checked)
    assert build_parser().parse_args(["validate", "d", "--lr-scheduler", "linear"]).lr_scheduler == "linear"
    # the parsed defaults build the dataclass's own defaults
    args = build_parser().parse_args(["analyze", "--model", "m", "--data", "d"])
    assert (args.top_k, args.kfac_batches, args.quant_formats) == (
        AnalysisConfig.top_k,
        AnalysisConfig.kfac_batches,
        "",
    )
