"""Typed results (``hessrank.results``): lossless round trips of the pipeline's real documents, and clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest

from hessrank.errors import HessrankError
from hessrank.results import (
    AnalysisResult,
    ModuleAdvice,
    Recommendation,
    RepeatResult,
    ScopeResult,
    ValidationResult,
    adalora_init_rank,
    competitor_notes,
    load_analysis_result,
    load_recommendation,
    load_validation,
)

OPTS = {"label_names": ("negative", "positive"), "template": "Review: {text}\nSentiment:"}


@pytest.fixture(scope="module")
def pipeline(tiny_llama_dir, tmp_path_factory):
    """A tiny analysis (module and joint scopes, two repeats, K-FAC, NF4), its recommendation and a one-seed
    validation: the three documents as the pipeline writes them."""
    from hessrank.advisor import recommend, write_recommendation
    from hessrank.analysis import AnalysisConfig, analyze
    from hessrank.trainer.validate import ValidateConfig, validate

    d = tmp_path_factory.mktemp("results")
    rows = ["text\tlabel"] + [f"{'good great' if i % 2 else 'bad dull'} film {i}\t{i % 2}" for i in range(120)]
    (d / "data.tsv").write_text("\n".join(rows) + "\n")
    an = d / "analysis"
    analyze(
        AnalysisConfig(
            model=str(tiny_llama_dir),
            data=str(d / "data.tsv"),
            modules="q_proj,v_proj",
            scopes=("module", "joint"),
            repeats=2,
            top_k=3,
            negative_k=0,
            slq_probes=1,
            slq_steps=4,
            batch_size=8,
            num_batches=1,
            max_length=16,
            kfac_batches=4,
            quant_formats=("nf4",),
            quant_sign_probes=1,
            quant_eval_batches=1,
            data_options=OPTS,
        ),
        an,
        progress=False,
    )
    write_recommendation(recommend(an), an)
    cfg = ValidateConfig(
        recommendation=str(an / "recommendation.json"),
        steps=2,
        eval_every=1,
        batch_size=8,
        lr=1e-2,
        seeds=(0,),
        multipliers=(1.0, 2.0),
        competitors=(),
        max_extensions=0,
        max_train=48,
        max_eval=16,
    )
    validate(cfg, d / "validation", progress=False)
    return an, d / "validation"


def _raw(path):
    text = path.read_text()
    return text, json.loads(text)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cls,where",
    [
        (AnalysisResult, "analysis/analysis.json"),
        (Recommendation, "analysis/recommendation.json"),
        (ValidationResult, "validation/validation.json"),
    ],
)
def test_real_documents_round_trip_exactly(pipeline, cls, where):
    an, _ = pipeline
    path = an.parent / where
    text, d = _raw(path)
    res = cls.from_dict(d, source=path)
    back = res.to_dict()
    assert back == d
    assert json.dumps(back) == json.dumps(d)  # key order included
    assert json.dumps(back, indent=2) + "\n" == text  # what write_json writes: the file, byte for byte
    assert cls.from_dict(back) == res


@pytest.mark.slow
def test_typed_fields_are_the_ones_the_pipeline_reads(pipeline):
    an, val_dir = pipeline
    a = load_analysis_result(an)
    doc = json.loads((an / "analysis.json").read_text())
    assert [s.name for s in a.scopes] == [s["name"] for s in doc["scopes"]]
    assert {s.kind for s in a.scopes} == {"module", "joint"}
    assert all(isinstance(s, ScopeResult) and len(s.repeats) == 2 for s in a.scopes)
    rep = a.scopes[0].repeats[0]
    assert isinstance(rep, RepeatResult) and rep.eigenvalues == tuple(doc["scopes"][0]["repeats"][0]["eigenvalues"])
    assert rep.extra["loss"] == doc["scopes"][0]["repeats"][0]["loss"]  # untyped keys are kept
    assert a.module_shapes == {m: tuple(v["shape"]) for m, v in doc["modules"].items()}
    # every module's numbers come from its own scope when it has one
    assert all(s.kind == "module" and s.name == m for m, (s, _) in a.module_sources().items())
    assert rep.newton_module(f"{a.newton_z[0]:g}", rep.modules[0]) is not None

    r = load_recommendation(an)
    rec = json.loads((an / "recommendation.json").read_text())
    assert r.global_rank == rec["global_rank"] and r.ranks == {m: d["rank"] for m, d in rec["modules"].items()}
    assert all(isinstance(x, ModuleAdvice) for x in r.modules.values())
    assert set(r.adapted) == {m for m, d in rec["modules"].items() if d["rank"] > 0}

    v = load_validation(val_dir)
    assert v.verdict in ("right", "too small", "beaten", "too large", "inconclusive")
    assert [row["run"] for row in v.runs] == [
        row["run"] for row in json.loads((val_dir / "validation.json").read_text())["runs"]
    ]


@pytest.mark.slow
def test_recommend_reads_the_typed_analysis_the_same_way(pipeline):
    from hessrank.advisor import recommend

    an, _ = pipeline
    by_path = recommend(an)
    by_type = recommend(load_analysis_result(an))
    by_dict = recommend(json.loads((an / "analysis.json").read_text()))
    for r in (by_type, by_dict):
        assert json.dumps({**r, "created": None}) == json.dumps({**by_path, "created": None})
    # what recommend builds is what the typed recommendation gives back
    assert Recommendation.from_dict(by_path).to_dict() == by_path


@pytest.mark.slow
def test_built_in_python_the_documented_order_is_the_writers(pipeline):
    an, _ = pipeline
    doc = json.loads((an / "analysis.json").read_text())
    a = AnalysisResult.from_dict(doc)
    names = [f.name for f in dataclasses.fields(a) if f.metadata.get("json")]
    fresh = AnalysisResult(**{n: getattr(a, n) for n in names})  # no key order remembered
    assert json.dumps(fresh.to_dict()) == json.dumps(doc)
    # a field changed after reading is written; one the source lacked is appended, not dropped
    assert dataclasses.replace(a, pilot={"x": 1}).to_dict()["pilot"] == {"x": 1}
    old = {k: v for k, v in doc.items() if k not in ("pilot", "distributed")}  # an analysis made before them
    o = AnalysisResult.from_dict(old)
    assert o.pilot is None and o.to_dict() == old and "pilot" not in o.to_dict()
    assert list(dataclasses.replace(o, pilot={"x": 1}).to_dict())[-1] == "pilot"
    # a module's advice leaves out compensation and quantization while it has none (older writers did)
    adv = ModuleAdvice(shape=(4, 8), rank=2)
    assert "compensation" not in adv.to_dict() and adv.to_dict()["shape"] == [4, 8]


def _analysis_doc():
    rep = {"scope": "joint", "kind": "joint", "repeat": 0, "modules": ["a"], "eigenvalues": [2.0, 1.0], "loss": 0.5}
    return {
        "schema": "hessrank.analysis/1",
        "created": "2024-01-01T00:00:00Z",
        "config": {"batch_size": 8, "max_length": 16},
        "model": {"name": "m", "task": "seq-cls"},
        "data": {"source": "d.tsv"},
        "analysis_point": {"kind": "pretrained"},
        "modules": {"a": {"shape": [4, 8]}},
        "architecture": {"num_parameters": 1},
        "newton_z": [0.01],
        "scopes": [{"name": "joint", "kind": "joint", "modules": ["a"], "summary": {}, "repeats": [rep]}],
        "future_field": {"kept": True},
    }


def test_a_synthetic_document_with_unknown_keys_round_trips():
    d = _analysis_doc()
    a = AnalysisResult.from_dict(d)
    assert a.extra == {"future_field": {"kept": True}} and a.to_dict() == d
    assert list(a.to_dict()) == list(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("scopes"), "x/analysis.json: required field 'scopes' is missing"),
        (lambda d: d.pop("schema"), "x/analysis.json: field 'schema' is None; expected a 'hessrank.analysis/1'"),
        (lambda d: d.update(schema="hessrank.recommendation/1"), "field 'schema' is 'hessrank.recommendation/1'"),
        (lambda d: d.update(schema="hessrank.analysis/2"), "field 'schema' is 'hessrank.analysis/2'"),
        (lambda d: d["scopes"][0]["repeats"][0].pop("eigenvalues"), "'scopes[0].repeats[0].eigenvalues' is missing"),
        (lambda d: d["scopes"][0].pop("name"), "required field 'scopes[0].name' is missing"),
        (lambda d: d.update(scopes={"joint": 1}), "field 'scopes' should be a list, found an object"),
        (lambda d: d.update(modules=[]), "field 'modules' should be an object, found a list"),
        (lambda d: d["scopes"][0].update(kind="layer"), "field 'scopes[0].kind' is 'layer'; expected one of"),
        (lambda d: d["scopes"][0].update(repeats=[]), "field 'scopes[0].repeats' is empty"),
    ],
)
def test_analysis_errors_name_the_file_and_the_field(edit, message):
    d = copy.deepcopy(_analysis_doc())
    edit(d)
    with pytest.raises(HessrankError, match=re.escape(message)):
        AnalysisResult.from_dict(d, source="x/analysis.json")


def test_recommendation_and_validation_errors():
    rec = {"schema": "hessrank.recommendation/1", "analysis": {}, "model": "m", "task": "seq-cls", "global_rank": 2}
    with pytest.raises(HessrankError, match=re.escape("recommendation.json: required field 'modules' is missing")):
        Recommendation.from_dict(rec)
    bad = {**rec, "modules": {"a": {"shape": [4, 8], "rank": "2"}}}
    with pytest.raises(
        HessrankError, match=re.escape("field 'modules['a'].rank' should be an integer, found a string")
    ):
        Recommendation.from_dict(bad)
    with pytest.raises(HessrankError, match=re.escape("required field 'modules['a'].shape' is missing")):
        Recommendation.from_dict({**rec, "modules": {"a": {"rank": 2}}})
    ok = {**rec, "modules": {"a": {"shape": [4, 8], "rank": 2}}}
    assert Recommendation.from_dict(ok).to_dict() == ok
    with pytest.raises(
        HessrankError, match=re.escape("validation.json: field 'schema' is 'hessrank.recommendation/1'")
    ):
        ValidationResult.from_dict(ok)
    with pytest.raises(HessrankError, match="the document should be an object, found a list"):
        ValidationResult.from_dict([])  # type: ignore[arg-type]


def test_loaders_refuse_missing_and_foreign_files(tmp_path):
    with pytest.raises(HessrankError, match="no such analysis folder or file"):
        load_analysis_result(tmp_path / "nope")
    (tmp_path / "analysis.json").write_text(json.dumps({"schema": "hessrank.validation/1"}))
    with pytest.raises(HessrankError, match=re.escape("expected a 'hessrank.analysis/1' document")):
        load_analysis_result(tmp_path)
    with pytest.raises(HessrankError, match=re.escape("recommendation.json: file not found")):
        load_recommendation(tmp_path)
    d = _analysis_doc()
    d.pop("model")
    (tmp_path / "analysis.json").write_text(json.dumps(d))
    with pytest.raises(
        HessrankError, match=re.escape(f"{tmp_path / 'analysis.json'}: required field 'model' is missing")
    ):
        load_analysis_result(tmp_path)


def test_competitor_notes_explain_adalora_initial_count_only():
    """AdaLoRA's parameter count is PEFT's at its initial rank (1.5x the final, at least one more); other rows get
    no note, and a rank column that names no single rank gets none either."""
    assert [adalora_init_rank(r) for r in (1, 2, 5, 8)] == [2, 3, 7, 12]
    rows = [
        {"run": "eva", "method": "lora-eva", "ranks": "5 (60 modules)"},
        {"run": "adalora", "method": "adalora", "ranks": "5"},
    ]
    (note,) = competitor_notes(rows)
    assert note.startswith("adalora: ") and "initial rank 7 per module" in note and "to rank 5 per module" in note
    assert competitor_notes([{"run": "adalora", "method": "adalora", "ranks": r} for r in ("-", "")]) == []
