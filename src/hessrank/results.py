"""Typed results of the pipeline: Python mirrors of ``analysis.json``, ``recommendation.json``, ``validation.json``.

The files stay the contract (``docs/schemas.md``); these frozen dataclasses are how Python code reads them. Each
type gives the fields the pipeline reads a name and a type, and keeps every other key, in its place, so that

    X.from_dict(d).to_dict() == d        (same keys, same values, same key order)

for every document the pipeline writes, old ones (without fields added since) included. Nested sub-documents a
type would add nothing to (``config``, ``kfac``, ``quantization``, ``memory``, ...) stay plain dicts; JSON lists
become tuples and go back to lists. ``to_dict`` does not copy those nested dicts: treat them as read-only.

* :class:`AnalysisResult` — ``analysis.json`` (``hessrank.analysis/1``); its ``scopes`` are :class:`ScopeResult`,
  and each scope's ``repeats`` :class:`RepeatResult` (one unit: one scope at one repeat).
* :class:`Recommendation` — ``recommendation.json`` (``hessrank.recommendation/1``); its ``modules`` are
  :class:`ModuleAdvice`.
* :class:`ValidationResult` — ``validation.json`` (``hessrank.validation/1``).

``from_dict`` raises :class:`~hessrank.errors.HessrankError` naming the file and the field when a required field
is missing or has the wrong type, or the document carries another schema. ``load_analysis_result``,
``load_recommendation`` and ``load_validation`` read a file (or the folder holding it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import HessrankError

ANALYSIS_SCHEMA = "hessrank.analysis/1"
RECOMMENDATION_SCHEMA = "hessrank.recommendation/1"
VALIDATION_SCHEMA = "hessrank.validation/1"

SCOPE_KINDS = ("module", "group", "joint")

_T = TypeVar("_T", bound="_Document")


def _md(
    *,
    required: bool = False,
    kind: str = "value",
    of: type | None = None,
    types: tuple[type, ...] | None = None,
    omit_none: bool = False,
) -> dict[str, Any]:
    """The metadata of a field that is a JSON key of the document (``field(metadata=_md(...))``).

    ``required``: the key must be present (such a field has no default). ``kind``: ``value`` (kept as it is),
    ``tuple`` (a JSON list, held as a tuple), ``items`` (a list of ``of`` documents), ``map`` (an object of ``of``
    documents). ``types``: the JSON types a value may have (null is always allowed for an optional field).
    ``omit_none``: a document built in Python leaves the key out while it is None (fields that older writers left
    out rather than writing null).
    """
    return {"json": True, "required": required, "kind": kind, "of": of, "types": types, "omit_none": omit_none}


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
_JSON_NAMES.update({float: "a number", type(None): "null", tuple: "a list"})


def _type_name(t: type) -> str:
    return _JSON_NAMES.get(t, t.__name__)


@dataclass(frozen=True, kw_only=True)
class _Document:
    """Shared machinery: typed JSON keys, every other key in ``extra``, the key order of the source."""

    #: keys of the source that no field names, in their order of appearance
    extra: dict[str, Any] = field(default_factory=dict)
    #: the source document's keys in order (None: built in Python; then fields in declaration order, extra last)
    key_order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    _WHAT: ClassVar[str] = "document"
    _SCHEMA: ClassVar[str | None] = None

    @classmethod
    def _json_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("json")]

    @classmethod
    def from_dict(cls: type[_T], d: Mapping[str, Any], *, source: str | Path | None = None) -> _T:
        """The typed view of a parsed document; ``source`` (a file name) is named in errors."""
        return cls._decode(d, str(source) if source is not None else cls._WHAT, "")

    @classmethod
    def _decode(cls: type[_T], d: Any, file: str, path: str) -> _T:
        here = path.rstrip(".") or "the document"
        if not isinstance(d, Mapping):
            raise HessrankError(f"{file}: {here} should be an object, found {_type_name(type(d))}")
        if cls._SCHEMA is not None:
            _check_schema(d.get("schema"), cls._SCHEMA, file)
        kwargs: dict[str, Any] = {}
        for f in cls._json_fields():
            md, name = f.metadata, f.name
            if name not in d:
                if md["required"]:
                    raise HessrankError(f"{file}: required field '{path}{name}' is missing")
                continue
            kwargs[name] = _decode_value(d[name], md, file, f"{path}{name}")
        names = {f.name for f in cls._json_fields()}
        extra = {k: v for k, v in d.items() if k not in names}
        obj = cls(**kwargs, extra=extra, key_order=tuple(d))
        obj._check(file, path)
        return obj

    def _check(self, file: str, path: str) -> None:
        """Checks beyond presence and type (a subclass's)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: the source's keys in the source's order (built in Python: the documented order)."""
        fields = {f.name: f for f in self._json_fields()}
        values = {name: getattr(self, name) for name in fields}
        if self.key_order is not None:
            order: list[str] = list(self.key_order)
        else:
            order = [n for n, f in fields.items() if not (f.metadata["omit_none"] and values[n] is None)]
        out: dict[str, Any] = {}
        for k in order:
            if k in fields:
                out[k] = _encode_value(values[k], fields[k].metadata)
            elif k in self.extra:
                out[k] = self.extra[k]
        # a field set after reading (dataclasses.replace) that the source lacked, then keys only in ``extra``
        for k, f in fields.items():
            if k not in out and values[k] is not None:
                out[k] = _encode_value(values[k], f.metadata)
        for k, v in self.extra.items():
            if k not in out:
                out[k] = v
        return out


def _check_schema(got: Any, want: str, file: str) -> None:
    """The schema name must match and so must the major version (``name/major``)."""
    ok = isinstance(got, str) and got.split("/")[0] == want.split("/")[0]
    ok = ok and got.partition("/")[2].split(".")[0] == want.partition("/")[2]
    if not ok:
        raise HessrankError(f"{file}: field 'schema' is {got!r}; expected a '{want}' document")


def _decode_value(v: Any, md: Mapping[str, Any], file: str, path: str) -> Any:
    if v is None and not md["required"]:
        return None
    kind, types = md["kind"], md["types"]
    if kind in ("tuple", "items") and not isinstance(v, (list, tuple)):
        raise HessrankError(f"{file}: field '{path}' should be a list, found {_type_name(type(v))}")
    if kind == "map" and not isinstance(v, Mapping):
        raise HessrankError(f"{file}: field '{path}' should be an object, found {_type_name(type(v))}")
    if types is not None and not isinstance(v, types):
        want = " or ".join(_type_name(t) for t in types)
        raise HessrankError(f"{file}: field '{path}' should be {want}, found {_type_name(type(v))}")
    if kind == "tuple":
        return tuple(v)
    if kind == "items":
        return tuple(md["of"]._decode(x, file, f"{path}[{i}].") for i, x in enumerate(v))
    if kind == "map":
        return {k: md["of"]._decode(x, file, f"{path}[{k!r}].") for k, x in v.items()}
    return v


def _encode_value(v: Any, md: Mapping[str, Any]) -> Any:
    if v is None:
        return None
    kind = md["kind"]
    if kind == "tuple":
        return list(v)
    if kind == "items":
        return [x.to_dict() for x in v]
    if kind == "map":
        return {k: x.to_dict() for k, x in v.items()}
    return v


_NUM = (int, float)


# ----------------------------------------------------------------------------------------------------------
# analysis.json
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RepeatResult(_Document):
    """One work unit of ``analysis.json``: one scope measured on one repeat's batches (``scopes[i].repeats[j]``).

    Typed: what the advisor reads. The rest (loss, trace, negative eigenvalues, costs, ...) is in ``extra``.
    """

    _WHAT: ClassVar[str] = "analysis.json"

    scope: str | None = field(default=None, metadata=_md(types=(str,)))
    kind: str | None = field(default=None, metadata=_md(types=(str,)))
    repeat: int | None = field(default=None, metadata=_md(types=(int,)))
    modules: tuple[str, ...] | None = field(default=None, metadata=_md(kind="tuple"))
    num_params: int | None = field(default=None, metadata=_md(types=(int,)))
    eigenvalues: tuple[float | None, ...] = field(metadata=_md(required=True, kind="tuple"))  #: top-k, descending
    converged: Any = field(default=None, metadata=_md())
    grad_projections: tuple[float | None, ...] | None = field(default=None, metadata=_md(kind="tuple"))  #: gᵢ = ∇Lᵀvᵢ
    effective_dimension: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    module_mass: dict[str, list[float]] | None = field(default=None, metadata=_md(types=(dict,)))
    module_curvature_share: dict[str, float] | None = field(default=None, metadata=_md(types=(dict,)))
    #: {z key: {z, predicted_change_full, per_module: {module: {energy_rank, step_norm, ..., curve}}}}
    newton: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))

    def newton_module(self, z_key: str, module: str) -> dict[str, Any] | None:
        """The damped Newton step's data for ``module`` at damping ``z_key`` (None when the unit has none)."""
        per = ((self.newton or {}).get(z_key) or {}).get("per_module") or {}
        return per.get(module)


@dataclass(frozen=True, kw_only=True)
class ScopeResult(_Document):
    """One entry of ``analysis.json`` ``scopes``: a module, a PEFT group or the joint scope, over its repeats."""

    _WHAT: ClassVar[str] = "analysis.json"

    name: str = field(metadata=_md(required=True, types=(str,)))
    kind: str = field(metadata=_md(required=True, types=(str,)))  #: ``module``, ``group`` or ``joint``
    modules: tuple[str, ...] = field(metadata=_md(required=True, kind="tuple"))
    #: over the repeats: eigenvalues_mean/std, lambda_max_mean, n_eff, converged, num_params
    summary: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    repeats: tuple[RepeatResult, ...] = field(metadata=_md(required=True, kind="items", of=RepeatResult))

    def _check(self, file: str, path: str) -> None:
        if self.kind not in SCOPE_KINDS:
            raise HessrankError(
                f"{file}: field '{path}kind' is {self.kind!r}; expected one of {', '.join(SCOPE_KINDS)}"
            )
        if not self.repeats:
            raise HessrankError(f"{file}: field '{path}repeats' is empty (a scope has at least one repeat)")


def module_sources(scopes: Sequence[ScopeResult]) -> dict[str, tuple[ScopeResult, RepeatResult]]:
    """For each module, the (scope, repeat 0) its per-module numbers come from: its own scope if analysed, else its
    group, else the joint scope."""
    pref = {kind: i for i, kind in enumerate(SCOPE_KINDS)}
    out: dict[str, tuple[ScopeResult, RepeatResult]] = {}
    for scope in sorted(scopes, key=lambda s: pref[s.kind]):
        for m in scope.modules:
            out.setdefault(m, (scope, scope.repeats[0]))
    return out


@dataclass(frozen=True, kw_only=True)
class AnalysisResult(_Document):
    """``analysis.json`` (``hessrank.analysis/1``): the top-level fields; ``scopes`` typed, the rest plain dicts."""

    _WHAT: ClassVar[str] = "analysis.json"
    _SCHEMA: ClassVar[str | None] = ANALYSIS_SCHEMA

    schema: str = field(metadata=_md(required=True, types=(str,)))
    created: str = field(metadata=_md(required=True, types=(str,)))
    versions: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    config: dict[str, Any] = field(metadata=_md(required=True, types=(dict,)))  #: the AnalysisConfig
    model: dict[str, Any] = field(
        metadata=_md(required=True, types=(dict,))
    )  #: name, class, path, num_parameters, task
    data: dict[str, Any] = field(metadata=_md(required=True, types=(dict,)))
    analysis_point: dict[str, Any] = field(metadata=_md(required=True, types=(dict,)))
    modules: dict[str, dict[str, Any]] = field(
        metadata=_md(required=True, types=(dict,))
    )  #: {module: {shape, params, group}}
    architecture: dict[str, Any] = field(metadata=_md(required=True, types=(dict,)))
    newton_z: tuple[float, ...] = field(metadata=_md(required=True, kind="tuple"))
    rank_grid: tuple[int, ...] | None = field(default=None, metadata=_md(kind="tuple"))
    scopes: tuple[ScopeResult, ...] = field(metadata=_md(required=True, kind="items", of=ScopeResult))
    kfac: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    pilot: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    quantization: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    cost: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    arrays: str | None = field(default=None, metadata=_md(types=(str,)))
    distributed: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module: (out_features, in_features)} of every target module."""
        return {m: (int(v["shape"][0]), int(v["shape"][1])) for m, v in self.modules.items()}

    def scope(self, name: str) -> ScopeResult:
        for s in self.scopes:
            if s.name == name:
                return s
        raise HessrankError(f"analysis has no scope '{name}'; it has {', '.join(s.name for s in self.scopes)}")

    def module_sources(self) -> dict[str, tuple[ScopeResult, RepeatResult]]:
        """See :func:`module_sources`."""
        return module_sources(self.scopes)


# ----------------------------------------------------------------------------------------------------------
# recommendation.json
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModuleAdvice(_Document):
    """One entry of ``recommendation.json`` ``modules``: a module's rank and the evidence behind it."""

    _WHAT: ClassVar[str] = "recommendation.json"

    shape: tuple[int, ...] = field(metadata=_md(required=True, kind="tuple"))  #: (out_features, in_features)
    source_scope: str | None = field(default=None, metadata=_md(types=(str,)))
    estimators: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    predicted_decrease: dict[str, Any] | None = field(
        default=None, metadata=_md(types=(dict,))
    )  #: the K-FAC curve in loss units
    pilot: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    predicted_decrease_full_rank: float | None = field(default=None, metadata=_md(types=_NUM))
    curvature_share: float | None = field(default=None, metadata=_md(types=_NUM))
    gain_share: float | None = field(default=None, metadata=_md(types=_NUM))
    selected: bool | None = field(default=None, metadata=_md(types=(bool,)))
    rank: int = field(metadata=_md(required=True, types=(int,)))  #: 0 = no adapter
    rank_rule: str | None = field(default=None, metadata=_md(types=(str,)))
    alpha: float | None = field(default=None, metadata=_md(types=_NUM))
    reasons: tuple[str, ...] | None = field(default=None, metadata=_md(kind="tuple"))
    compensation: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,), omit_none=True))
    quantization: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,), omit_none=True))


@dataclass(frozen=True, kw_only=True)
class Recommendation(_Document):
    """``recommendation.json`` (``hessrank.recommendation/1``); ``modules`` typed, nested sections plain dicts."""

    _WHAT: ClassVar[str] = "recommendation.json"
    _SCHEMA: ClassVar[str | None] = RECOMMENDATION_SCHEMA

    schema: str = field(metadata=_md(required=True, types=(str,)))
    created: str | None = field(default=None, metadata=_md(types=(str,)))
    hessrank_version: str | None = field(default=None, metadata=_md(types=(str,)))
    analysis: dict[str, Any] = field(
        metadata=_md(required=True, types=(dict,))
    )  #: model, data, created, config, seconds_units
    model: str = field(metadata=_md(required=True, types=(str,)))
    task: str = field(metadata=_md(required=True, types=(str,)))
    head_modules: tuple[str, ...] | None = field(default=None, metadata=_md(kind="tuple"))
    settings: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    estimator: str | None = field(default=None, metadata=_md(types=(str,)))
    estimator_note: str | None = field(default=None, metadata=_md(types=(str,)))
    estimators: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    calibration: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    global_rank: int = field(metadata=_md(required=True, types=(int,)))
    lora: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,), omit_none=True))
    uniform_curve: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    quantization: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    modules: dict[str, ModuleAdvice] = field(metadata=_md(required=True, kind="map", of=ModuleAdvice))
    selection: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    trainable_parameters: int | None = field(default=None, metadata=_md(types=(int,)))
    memory: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    budget: str | None = field(default=None, metadata=_md(types=(str,)))
    allocation: str | None = field(default=None, metadata=_md(types=(str,)))
    confidence: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    rules_of_thumb: tuple[dict[str, Any], ...] | None = field(default=None, metadata=_md(kind="tuple"))
    explanation: tuple[str, ...] | None = field(default=None, metadata=_md(kind="tuple"))
    files: dict[str, Any] | None = field(
        default=None, metadata=_md(types=(dict,), omit_none=True)
    )  #: written by write_recommendation

    @property
    def ranks(self) -> dict[str, int]:
        """{module: rank} of every module (0: no adapter)."""
        return {m: a.rank for m, a in self.modules.items()}

    @property
    def adapted(self) -> dict[str, ModuleAdvice]:
        """The modules that get an adapter (rank > 0)."""
        return {m: a for m, a in self.modules.items() if a.rank > 0}


# ----------------------------------------------------------------------------------------------------------
# validation.json
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ValidationResult(_Document):
    """``validation.json`` (``hessrank.validation/1``): the verdict typed, its tables plain dicts and lists."""

    _WHAT: ClassVar[str] = "validation.json"
    _SCHEMA: ClassVar[str | None] = VALIDATION_SCHEMA

    schema: str = field(metadata=_md(required=True, types=(str,)))
    created: str | None = field(default=None, metadata=_md(types=(str,)))
    config: dict[str, Any] = field(metadata=_md(required=True, types=(dict,)))  #: the ValidateConfig
    recipe: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    advice: dict[str, Any] = field(metadata=_md(required=True, types=(dict,)))
    ladder: dict[str, Any] | None = field(
        default=None, metadata=_md(types=(dict,))
    )  #: {rank: {eval_loss, accuracy, trainable_params}}
    best_rank_run_loss: float | None = field(default=None, metadata=_md(types=_NUM))
    knee_rank: int | None = field(default=None, metadata=_md(types=(int,)))
    knee_params: int | None = field(default=None, metadata=_md(types=(int,)))
    #: the reported loss the knee is measured from (since session 24; absent before: the lowest reported loss)
    knee_reference_loss: float | None = field(default=None, metadata=_md(types=_NUM))
    verdict: str = field(metadata=_md(required=True, types=(str,)))
    provisional_verdict: str | None = field(default=None, metadata=_md(types=(str,)))
    unsettled_runs: tuple[str, ...] | None = field(default=None, metadata=_md(kind="tuple"))
    why: str | None = field(default=None, metadata=_md(types=(str,)))
    rival: str | None = field(default=None, metadata=_md(types=(str,)))
    paired: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    band: float | None = field(default=None, metadata=_md(types=_NUM))
    competitors: tuple[dict[str, Any], ...] | None = field(default=None, metadata=_md(kind="tuple"))
    accuracy_note: str | None = field(default=None, metadata=_md(types=(str,)))
    quantization_after_training: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    cost: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    runs: tuple[dict[str, Any], ...] = field(metadata=_md(required=True, kind="tuple"))  #: one row per training run
    errors: dict[str, Any] | None = field(default=None, metadata=_md(types=(dict,)))
    seconds: float | None = field(default=None, metadata=_md(types=_NUM))


def minus_advice_text(row: dict[str, Any]) -> str:
    """A ``competitors[]`` row's difference from the advice, "(paired, n seeds)" when averaged seed by seed."""
    n = int(row.get("seeds") or 1)
    return f"{row['minus_advice']:+.4f}" + (f" (paired, {n} seeds)" if n > 1 else "")


def adalora_init_rank(target_rank: int) -> int:
    """AdaLoRA's initial rank per module for a final budget of ``target_rank`` per module on average: 1.5× it, at
    least one more — the initial budget b(0) = 1.5·b(T) of the AdaLoRA paper's experiments (Zhang et al., "Adaptive
    Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023)."""
    return max(target_rank + target_rank // 2, target_rank + 1)


def competitor_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sentences the competitor table needs to be read fairly (rendered under it in validation.md and the HTML
    report). AdaLoRA: its "trainable params" is PEFT's count at its initial rank (:func:`adalora_init_rank`), which
    its schedule prunes to the final budget its rank column names; the comparison "at equal or fewer parameters"
    uses that initial count, as PEFT reports it."""
    notes = []
    for r in rows:
        head = str(r.get("ranks", "")).split()[:1]  # "5", or "5 (60 modules)"
        if r.get("method") != "adalora" or not head or not head[0].isdigit():
            continue
        target = int(head[0])
        notes.append(
            f"{r['run']}: trainable params as PEFT counts them at AdaLoRA's initial rank {adalora_init_rank(target)} "
            f"per module; its budget schedule prunes them to rank {target} per module on average (the final budget "
            f"of uniform rank {target})."
        )
    return notes


# ----------------------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------------------


def _load(cls: type[_T], path: str | Path, filename: str, hint: str) -> _T:
    from .io import read_json

    p = Path(path)
    if not p.exists():
        raise HessrankError(f"{p}: no such {filename.split('.')[0]} folder or file ({hint})")
    if p.is_dir():
        p = p / filename
    assert cls._SCHEMA is not None
    return cls.from_dict(read_json(p, schema=cls._SCHEMA), source=p)


def load_analysis_result(path: str | Path) -> AnalysisResult:
    """``analysis.json`` (the file, or the folder holding it) as an :class:`AnalysisResult`."""
    return _load(AnalysisResult, path, "analysis.json", f"run hessrank analyze --out {Path(path)} first")


def load_recommendation(path: str | Path) -> Recommendation:
    """``recommendation.json`` (the file, or the folder holding it) as a :class:`Recommendation`."""
    return _load(Recommendation, path, "recommendation.json", "run hessrank recommend first")


def load_validation(path: str | Path) -> ValidationResult:
    """``validation.json`` (the file, or the folder holding it) as a :class:`ValidationResult`."""
    return _load(ValidationResult, path, "validation.json", "run hessrank validate first")
