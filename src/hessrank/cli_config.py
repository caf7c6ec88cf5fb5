"""One YAML config file for every subcommand (``--config FILE``); flags given on the command line override it.

The file holds *shared* keys at the top level — any subcommand that has an option of that name uses them — and one
optional section per subcommand whose keys must be that subcommand's options::

    model: minilm-l6          # shared: analyze, train and inspect have --model
    data: sst2
    seed: 0
    analyze:
      modules: query,value    # or a YAML list: [query, value]
      top_k: 8
    recommend:
      tolerance: 0.02
    train:
      epochs: 2
      rank_pattern: {bert.encoder.layer.5.attention.self.value: 4}   # TrainConfig fields without a flag
    validate:
      seeds: 3

Keys use the option names with ``_`` or ``-`` (``top_k`` or ``top-k``). A key no subcommand knows, a section key its
subcommand does not have, a value outside an option's choices or of the wrong type is refused with the file, the
key and what is allowed (exit code 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import HessrankError

#: Keys a ``train`` section may hold beyond its flags: TrainConfig fields that have no command-line option.
TRAIN_ONLY_FIELDS = (
    "rank_pattern",
    "alpha_pattern",
    "num_virtual_tokens",
    "weight_decay",
    "eval_fraction",
    "gen_max_new_tokens",
    "probe_head",
    "num_labels",
    "data_options",
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, or a clear error (missing file, bad YAML with its line, not a mapping)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise HessrankError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise HessrankError(f"{p}: not a UTF-8 text file") from None
    except OSError as e:
        raise HessrankError(f"{p}: cannot read the config file ({e.strerror or e}); check its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise HessrankError(f"{p}: not valid YAML{where} ({getattr(e, 'problem', None) or 'parse error'})") from None
    if not isinstance(d, dict):
        raise HessrankError(f"{p}: expected a mapping of options (key: value), got {type(d).__name__}")
    return d


def _options(sp: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The subcommand's options by destination name (``top_k``), without help and the config option itself."""
    return {
        a.dest: a
        for a in sp._actions  # argparse keeps no public list
        if a.option_strings and a.dest not in ("help", "config") and not isinstance(a, argparse._HelpAction)
    }


def _given(action: argparse.Action, argv: Sequence[str]) -> bool:
    return any(a == o or a.startswith(o + "=") for a in argv for o in action.option_strings)


def _coerce(path: Path, key: str, action: argparse.Action, value: Any) -> Any:
    """A config value as the option would have parsed it from the command line."""
    where = f"{path}: key '{key}'"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise HessrankError(f"{where} must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if isinstance(value, dict):
        raise HessrankError(f"{where} takes one value, not a mapping")
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            kind = getattr(action.type, "__name__", "value")
            raise HessrankError(f"{where} must be {kind}, got {value!r}") from None
    elif value is not None and not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise HessrankError(f"{where} is {value!r}; allowed: {', '.join(map(str, action.choices))}")
    return value


def apply_config(
    args: argparse.Namespace,
    command: str,
    sp: argparse.ArgumentParser,
    all_parsers: dict[str, argparse.ArgumentParser],
    argv: Sequence[str],
) -> dict[str, Any]:
    """Fill ``args`` from ``args.config`` where the command line did not give the option.

    Returns the section keys the options do not cover (for ``train``: TrainConfig fields without a flag).
    """
    path = Path(args.config)
    doc = load_yaml(path)
    opts = _options(sp)
    known_anywhere = {k for p in all_parsers.values() for k in _options(p)}
    allowed_extra = TRAIN_ONLY_FIELDS if command == "train" else ()
    extra: dict[str, Any] = {}
    for key, value in doc.items():
        k = str(key).replace("-", "_")
        if k in all_parsers:
            continue  # a section
        if k in allowed_extra:
            extra[k] = value
            continue
        if k not in known_anywhere and k not in TRAIN_ONLY_FIELDS:
            raise HessrankError(
                f"{path}: unknown key '{key}'; top-level keys are options of some subcommand "
                f"({', '.join(sorted(known_anywhere))}) or a section ({', '.join(sorted(all_parsers))})"
            )
        if k in opts and not _given(opts[k], argv):
            setattr(args, k, _coerce(path, key, opts[k], value))
    section = doc.get(command) or {}
    if not isinstance(section, dict):
        raise HessrankError(f"{path}: section '{command}' must be a mapping of options")
    for key, value in section.items():
        k = str(key).replace("-", "_")
        if k in opts:
            if not _given(opts[k], argv):
                setattr(args, k, _coerce(path, f"{command}.{key}", opts[k], value))
        elif k in allowed_extra:
            extra[k] = value
        else:
            raise HessrankError(
                f"{path}: '{command}' has no option '{key}'; allowed: {', '.join(sorted([*opts, *allowed_extra]))}"
            )
    return extra


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls`` (``default_factory`` called), as a command-line value:
    a tuple of strings becomes the comma-separated string the option parses."""
    import dataclasses

    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    if isinstance(v, tuple) and all(isinstance(x, str) for x in v):
        return ",".join(v)
    return v


def defaults_from_config(sp: argparse.ArgumentParser, cls: type, special: dict[str, Any] | None = None) -> None:
    """Give every option of ``sp`` whose destination is a field of the config dataclass ``cls`` that field's
    default, so the dataclass is the one place a default is written (``special``: dest -> default for options
    whose command-line form differs from the field, e.g. a count of seeds for a tuple of seeds)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    given = dict(special or {})
    for a in sp._actions:
        if a.dest in given or a.dest not in fields or not a.option_strings:
            continue
        try:
            given[a.dest] = field_default(cls, a.dest)
        except KeyError:  # a required field (model, data): no default to give
            continue
    sp.set_defaults(**given)
