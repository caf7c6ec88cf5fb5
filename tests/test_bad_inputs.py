"""Every bad input of issue 14 through the CLI: exit code 2, one line on stderr that names the file, field,
module or value and says how to fix it, and never a traceback.

Each case runs ``hessrank.cli.main`` in-process (the locked-folder case also with a real second process). The
cases use tiny inputs: a 2-layer random BERT (``tiny_bert_dir``) or Llama (``tiny_llama_dir``) with a bundled
tokenizer, and files written into the test's folder; the cases that need an analysis share one, made once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hessrank.cli import main

#: Options that keep an analysis of the tiny BERT to seconds.
FAST = [
    "--task",
    "seq-cls",
    "--modules",
    "query",
    "--top-k",
    "2",
    "--negative-k",
    "0",
    "--slq-probes",
    "0",
    "--batch-size",
    "4",
    "--num-batches",
    "1",
    "--max-length",
    "16",
    "--kfac-batches",
    "4",
    "--probe-examples",
    "8",
    "--device",
    "cpu",
    "--quiet",
]


def _rows(labels: list[str]) -> str:
    return "text\tlabel\n" + "".join(
        f"a {'good' if i % 2 else 'bad'} movie number {i}\t{y}\n" for i, y in enumerate(labels)
    )


def _write_inputs(d: Path) -> None:
    """The bad files the cases refer to, by name."""
    (d / "empty.tsv").write_bytes(b"")
    (d / "header_only.tsv").write_text("text\tlabel\n")
    (d / "latin1.tsv").write_bytes("text\tlabel\nun film très réussi\t1\n".encode("latin-1"))
    (d / "good.tsv").write_text(_rows([str(i % 2) for i in range(60)]))
    (d / "three_labels.tsv").write_text(_rows([["pos", "neg", "meh"][i % 3] for i in range(60)]))
    (d / "float_labels.tsv").write_text(_rows([f"{i % 2}.5" for i in range(60)]))
    (d / "negative_labels.tsv").write_text(_rows([str(-(i % 2)) for i in range(60)]))
    (d / "named_labels.tsv").write_text(_rows([["pos", "neg"][i % 2] for i in range(60)]))
    (d / "one_word.txt").write_text("hello\n" * 60)
    (d / "two_labels.yaml").write_text("task: seq-cls\ndevice: cpu\ntrain:\n  num_labels: 2\n")
    (d / "bad.yaml").write_text("analyze:\n  modules: [query, value\n")
    (d / "device_map_list.json").write_text('["cpu"]')
    (d / "unknown_section_key.yaml").write_text("analyze:\n  topk: 3\n")
    (d / "unknown_key.yaml").write_text("model: m\ndata: d\nranks: 3\n")
    (d / "wrong_type.yaml").write_text("analyze:\n  top_k: many\n")
    (d / "latin1.yaml").write_bytes("model: modèle\n".encode("latin-1"))
    (d / "model_file").write_text("not a model\n")
    (d / "no_config").mkdir()
    (d / "foreign").mkdir()
    (d / "foreign" / "notes.txt").write_text("mine\n")
    (d / "out_file").write_text("a file where a folder should be\n")
    (d / "other_train").mkdir()
    (d / "other_train" / "train_config.json").write_text(json.dumps({"config": {"model": "x", "data": "y"}}))
    (d / "broken_train").mkdir()
    (d / "broken_train" / "train_config.json").write_text(json.dumps({"config": {"rank": 3}}))
    (d / "not_analysis").mkdir()
    (d / "not_analysis" / "analysis.json").write_text(json.dumps({"schema": "something.else/1"}))
    (d / "truncated").mkdir()
    (d / "truncated" / "analysis.json").write_text('{"schema": "hessrank.analysis/1", "scopes": [')


@pytest.fixture()
def pickle_only_dir(tmp_path, tiny_bert_dir):
    """A model folder whose weights are a pickled ``pytorch_model.bin`` (no safetensors)."""
    d = tmp_path / "pickle_only"
    d.mkdir()
    for f in tiny_bert_dir.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    return d


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory, tiny_bert_dir):
    """One finished tiny analysis and its recommendation. Made after a failed first attempt into the same
    folder (a module pattern matching nothing): a run that finished no unit does not block a corrected rerun."""
    base = tmp_path_factory.mktemp("bad_inputs_analysis")
    (base / "s.tsv").write_text(_rows([str(i % 2) for i in range(120)]))
    out = base / "an"
    argv = ["analyze", "--model", str(tiny_bert_dir), "--data", str(base / "s.tsv"), *FAST, "--out", str(out)]
    bad = [a if a != "query" else "q_proj" for a in argv]
    assert main(bad) == 2
    assert main(argv) == 0, "the corrected command must run in the folder the failed one left"
    assert main(["recommend", str(out)]) == 0
    return out


D = "{d}"  # the test's folder, holding the files of _write_inputs
BERT = "{bert}"
AN = "{an}"

# (id, argv, words the one line must hold: the culprit and the fix)
CASES: list[tuple[str, list[str], list[str]]] = [
    # --- models
    ("model-path-missing", ["inspect", "--model", f"{D}/no/such/model"], ["no/such/model", "no such folder"]),
    ("model-path-is-file", ["inspect", "--model", f"{D}/model_file"], ["model_file", "is a file", "config.json"]),
    ("model-folder-no-config", ["inspect", "--model", f"{D}/no_config"], ["no_config", "has no config.json"]),
    (
        "model-pickle-only",
        ["inspect", "--model", "{pickle}", "--task", "seq-cls"],
        ["pytorch_model.bin", "safetensors"],
    ),
    ("unknown-bundled-name", ["inspect", "--model", "minilm-l7"], ["minilm-l7", "did you mean 'minilm-l6'", "models"]),
    ("hub-id-offline", ["inspect", "--model", "nobody/no-such-model-4711"], ["no-such-model-4711", "HF_HUB_OFFLINE"]),
    # --- data
    ("data-missing", ["analyze", "--model", BERT, "--data", f"{D}/nope.tsv", "--out", "o"], ["nope.tsv", "not found"]),
    ("data-is-folder", ["analyze", "--model", BERT, "--data", f"{D}/no_config", "--out", "o"], ["is a folder"]),
    ("data-empty", ["analyze", "--model", BERT, "--data", f"{D}/empty.tsv", "--out", "o"], ["empty.tsv", "empty"]),
    ("data-no-rows", ["analyze", "--model", BERT, "--data", f"{D}/header_only.tsv", "--out", "o"], ["no data rows"]),
    (
        "text-field-wrong",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--text-field", "review", "--out", "o"],
        ["text field 'review' not found", "available: 'text', 'label'"],
    ),
    (
        "label-field-wrong",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--label-field", "y", "--out", "o"],
        ["label field 'y' not found", "available: 'text', 'label'"],
    ),
    ("data-not-utf8", ["analyze", "--model", BERT, "--data", f"{D}/latin1.tsv", "--out", "o"], ["latin1.tsv", "UTF-8"]),
    (
        "labels-beyond-num-labels",
        ["analyze", "--model", BERT, "--data", f"{D}/three_labels.tsv", "--num-labels", "2", *FAST, "--out", "o"],
        ["three_labels.tsv", "3 distinct labels", "outside 0..1", "--num-labels"],
    ),
    (
        "train-labels-beyond-num-labels",
        ["train", "--model", BERT, "--data", f"{D}/three_labels.tsv", "--config", f"{D}/two_labels.yaml", "--out", "o"],
        ["three_labels.tsv", "3 distinct labels", "outside 0..1"],
    ),
    (
        "train-labels-not-integers",
        ["train", "--model", BERT, "--data", f"{D}/float_labels.tsv", "--task", "seq-cls", "--out", "o"],
        ["float_labels.tsv", "'0.5' is not a class index"],
    ),
    (
        "labels-not-integers",
        ["analyze", "--model", BERT, "--data", f"{D}/float_labels.tsv", *FAST, "--out", "o"],
        ["float_labels.tsv", "'0.5' is not a class index", "0..K-1"],
    ),
    (
        "labels-negative",
        ["analyze", "--model", BERT, "--data", f"{D}/negative_labels.tsv", *FAST, "--out", "o"],
        ["negative_labels.tsv", "negative label -1", "0..K-1"],
    ),
    (
        "labels-not-among-names",
        ["analyze", "--model", BERT, "--data", f"{D}/named_labels.tsv", "--label-names", "no,yes", *FAST, "--out", "o"],
        ["named_labels.tsv", "not among label_names"],
    ),
    (
        "every-sequence-truncated-to-nothing",
        ["analyze", "--model", "{llama}", "--data", f"{D}/one_word.txt", "--modules", "q_proj", "--out", "o"],
        ["one_word.txt", "no example has a token left to predict", "--max-length"],
    ),
    (
        "max-length-too-small",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--max-length", "2", "--out", "o"],
        ["--max-length must be at least 4", "got 2"],
    ),
    ("limit-zero", ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--limit", "0", "--out", "o"], ["--limit"]),
    (
        "too-few-examples",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--batch-size", "64", "--out", "o"],
        ["good.tsv", "too few"],
    ),
    # --- modules and k
    (
        "module-pattern-matches-nothing",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--modules", "q_proj", "--out", "o"],
        ["'q_proj' matches no linear module", "candidates: classifier, dense, key, query, value"],
    ),
    (
        "module-regex-invalid",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--modules", "re:query[", "--out", "o"],
        ["'query['", "not a valid regular expression"],
    ),
    (
        "device-map-unknown",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--device-map", "everywhere", "--out", "o"],
        ["'everywhere'", "auto, balanced", "JSON file"],
    ),
    (
        "device-map-not-an-object",
        [
            "analyze",
            "--model",
            BERT,
            "--data",
            f"{D}/good.tsv",
            "--device-map",
            f"{D}/device_map_list.json",
            "--out",
            "o",
        ],
        ["device_map_list.json", "{module: device}"],
    ),
    (
        "top-k-zero",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--top-k", "0", "--out", "o"],
        ["top-k", "0"],
    ),
    (
        "top-k-not-below-dimension",  # query on 2 layers: 2 x 16 x 16 = 512 parameters
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--top-k", "512", "--out", "o"],
        ["--top-k 512 is not below the dimension of scope 'joint' (512 parameters)", "below 512"],
    ),
    (
        "negative-k-not-below-dimension",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--negative-k", "600", "--out", "o"],
        ["--negative-k 600", "512 parameters"],
    ),
    # --- config files
    ("yaml-malformed", ["analyze", "--config", f"{D}/bad.yaml", "--out", "o"], ["bad.yaml", "not valid YAML at line"]),
    (
        "yaml-unknown-section-key",
        ["analyze", "--config", f"{D}/unknown_section_key.yaml", "--out", "o"],
        ["unknown_section_key.yaml", "'analyze' has no option 'topk'", "allowed:", "top_k"],
    ),
    (
        "yaml-unknown-key",
        ["train", "--config", f"{D}/unknown_key.yaml", "--out", "o"],
        ["unknown_key.yaml", "unknown key 'ranks'", "rank"],
    ),
    (
        "yaml-wrong-type",
        ["analyze", "--config", f"{D}/wrong_type.yaml", "--out", "o"],
        ["wrong_type.yaml", "'analyze.top_k' must be int", "'many'"],
    ),
    ("yaml-not-utf8", ["analyze", "--config", f"{D}/latin1.yaml", "--out", "o"], ["latin1.yaml", "not a UTF-8"]),
    ("config-missing", ["recommend", "x", "--config", f"{D}/none.yaml"], ["none.yaml", "config file not found"]),
    # --- devices and formats
    (
        "device-without-cuda",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--device", "cuda:0", "--out", "o"],
        ["'cuda:0'", "CUDA is not available", "--device cpu"],
    ),
    (
        "device-not-in-this-torch",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--device", "mps", "--out", "o"],
        ["'mps'", "not available", "--device cpu"],
    ),
    (
        "device-unknown",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--device", "tpu", "--out", "o"],
        ["'tpu'", "not a torch device"],
    ),
    (
        "quant-format-unknown",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--quant-formats", "int3", "--out", "o"],
        ["'int3'", "llm.int8", "nf4"],
    ),
    (
        "train-4bit-without-cuda",
        [
            "train",
            "--model",
            BERT,
            "--data",
            f"{D}/good.tsv",
            "--quantization",
            "nf4",
            "--device",
            "cuda",
            "--out",
            "o",
        ],
        ["'cuda'", "CUDA is not available"],
    ),
    # --- budgets and recommendations (need the shared analysis)
    ("param-budget-impossible", ["recommend", AN, "--param-budget", "1", "--out", "r"], ["budget 1", "rank-1 adapter"]),
    (
        "memory-budget-impossible",
        ["recommend", AN, "--memory-budget", "1KiB", "--out", "r"],
        ["memory budget 1.00 KiB", "below the forecast"],
    ),
    ("param-budget-not-a-number", ["recommend", AN, "--param-budget", "lots"], ["--param-budget 'lots'"]),
    (
        "recommendation-for-another-model",
        ["train", "--recommendation", f"{AN}/recommendation.json", "--model", "minilm-l6", "--out", "o"],
        ["recommendation.json", "made for model", "not 'minilm-l6'", "drop --model"],
    ),
    ("recommendation-missing", ["validate", f"{D}/none/recommendation.json", "--out", "v"], ["recommendation file"]),
    (
        "analysis-wrong-schema",
        ["recommend", f"{D}/not_analysis"],
        ["analysis.json", "expected a 'hessrank.analysis/1'"],
    ),
    ("analysis-truncated", ["recommend", f"{D}/truncated"], ["analysis.json", "not valid JSON"]),
    # --- output folders
    (
        "out-holds-foreign-files",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", *FAST, "--out", f"{D}/foreign"],
        ["foreign", "notes.txt", "hessrank did not write", "--overwrite"],
    ),
    (
        "out-holds-another-analysis",
        ["analyze", "--model", BERT, "--data", "{an_data}", *FAST, "--top-k", "3", "--out", AN],
        ["different configuration (differs in: top_k)", "--overwrite"],
    ),
    (
        "out-no-resume",
        ["analyze", "--model", BERT, "--data", "{an_data}", *FAST, "--no-resume", "--out", AN],
        ["--no-resume was given", "--overwrite"],
    ),
    (
        "train-out-holds-another-run",
        ["train", "--model", BERT, "--data", f"{D}/good.tsv", "--task", "seq-cls", "--out", f"{D}/other_train"],
        ["other_train", "holds a run with a different configuration (differs in: data, model", "--overwrite"],
    ),
    (
        "train-config-file-incomplete",
        ["train", "--model", BERT, "--data", f"{D}/good.tsv", "--task", "seq-cls", "--out", f"{D}/broken_train"],
        ["broken_train/train_config.json", "not a complete hessrank training configuration", "'data'", "--overwrite"],
    ),
    (
        "out-is-a-file",
        ["analyze", "--model", BERT, "--data", f"{D}/good.tsv", "--out", f"{D}/out_file"],
        ["not a folder"],
    ),
]

_NEEDS_ANALYSIS = {c[0] for c in CASES if any(AN in a or "{an_data}" in a for a in c[1])}


def _check_one_line(rc: int, err: str, needles: list[str]) -> str:
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err}"
    line = lines[0]
    assert line.startswith("hessrank ") and ": error: " in line, line
    for n in needles:
        assert n in line, f"{n!r} not in: {line}"
    return line


def _params() -> list:
    """The cases; those that make an analysis or need the tiny Llama (SmolLM2's tokenizer) are ``slow``."""
    slow = _NEEDS_ANALYSIS | {c[0] for c in CASES if "{llama}" in c[1]}
    return [pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in slow else []) for c in CASES]


@pytest.mark.parametrize("case_id,argv,needles", _params())
def test_bad_input_one_line_exit_2(case_id, argv, needles, tmp_path, monkeypatch, capsys, request):
    if "cuda" in case_id and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if case_id == "device-not-in-this-torch" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_inputs(tmp_path)
    subs = {"d": str(tmp_path)}
    if any(BERT in a for a in argv):
        subs["bert"] = str(request.getfixturevalue("tiny_bert_dir"))
    if any("{llama}" in a for a in argv):
        subs["llama"] = str(request.getfixturevalue("tiny_llama_dir"))
    if any("{pickle}" in a for a in argv):
        subs["pickle"] = str(request.getfixturevalue("pickle_only_dir"))
    if case_id in _NEEDS_ANALYSIS:
        an = request.getfixturevalue("analysis_dir")
        subs.update(an=str(an), an_data=str(an.parent / "s.tsv"))
    argv = [a.format(**subs) if "{" in a else a for a in argv]
    capsys.readouterr()
    rc = main(argv)
    _check_one_line(rc, capsys.readouterr().err, needles)


@pytest.mark.parametrize("what", ["data", "config"])
def test_unreadable_file(what, tmp_path, monkeypatch, capsys, tiny_bert_dir):
    """A file that exists but cannot be read (permissions; simulated, since the tests may run as root)."""
    monkeypatch.chdir(tmp_path)
    _write_inputs(tmp_path)
    locked = tmp_path / ("good.tsv" if what == "data" else "wrong_type.yaml")
    real_open, real_read = Path.open, Path.read_text

    def no_open(self, *a, **k):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *a, **k)

    def no_read(self, *a, **k):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "open", no_open)
    monkeypatch.setattr(Path, "read_text", no_read)
    if what == "data":
        argv = ["analyze", "--model", str(tiny_bert_dir), "--data", str(locked), *FAST, "--out", "o"]
    else:
        argv = ["analyze", "--config", str(locked), "--out", "o"]
    _check_one_line(main(argv), capsys.readouterr().err, [locked.name, "Permission denied", "permissions"])


def test_case_count():
    """The README's reliability section states this count; keep them in step."""
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(CASES)} bad inputs" in readme


def test_second_process_on_a_locked_folder(tmp_path, tiny_bert_dir, capsys):
    """A real second process holds the folder's lock: analyze refuses with its pid, and writes nothing."""
    out = tmp_path / "busy"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from hessrank.io import folder_lock
        with folder_lock({str(out)!r}, "analyze"):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        (tmp_path / "s.tsv").write_text(_rows([str(i % 2) for i in range(60)]))
        argv = ["analyze", "--model", str(tiny_bert_dir), "--data", str(tmp_path / "s.tsv"), *FAST, "--out", str(out)]
        line = _check_one_line(
            main(argv), capsys.readouterr().err, ["another hessrank process", "choose another --out"]
        )
        assert f"pid {proc.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [".hessrank.lock"]
    finally:
        proc.kill()
        proc.wait()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    """The installed entry point, not just ``main``: exit code 2 and one line (no logging, no traceback)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "hessrank", "inspect", "--model", "minilm-l7"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert "did you mean 'minilm-l6'" in r.stderr
