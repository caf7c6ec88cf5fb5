"""Files on disk: atomic writes, versioned JSON documents, run folders.

Every stage of hessrank reads and writes files with a documented schema (``docs/schemas.md``). Writes are
atomic (write to a temporary file in the same folder, fsync, ``os.replace``) so a killed process leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import HessrankError

_C = TypeVar("_C")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the block; a signal that arrives meanwhile is delivered when it ends.

    ``tempfile.mkstemp`` creates the file before it returns its name: a Ctrl-C in between would leave a
    temporary file nobody knows about. Blocking the two signals (POSIX ``pthread_sigmask``) around that call
    closes the window; elsewhere, where the mask cannot be set, the block runs unprotected.
    """
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def atomic_write(path: str | Path, writer: Callable[[Any], None], mode: str = "w") -> Path:
    """Write ``path`` atomically: ``writer(fileobj)`` fills a temporary sibling that then replaces ``path``.

    An exception or signal at any point (also between creating the temporary and learning its name) removes
    the temporary and leaves the old ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    fd: int | None = None
    try:
        with _signals_deferred():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the mode open() would give
        f = os.fdopen(fd, mode)
        fd = None  # the file object owns it now
        with f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays to JSON types; NaN/Inf become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented, key-ordered-as-given JSON (NaN/Inf written as null)."""
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text))


def read_json(path: str | Path, schema: str | None = None) -> dict[str, Any]:
    """Read a JSON document; if ``schema`` is given, check its ``schema`` field names that schema."""
    path = Path(path)
    if not path.is_file():
        raise HessrankError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HessrankError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if schema is not None:
        got = data.get("schema") if isinstance(data, dict) else None
        if got is None or str(got).split("/")[0] != schema.split("/")[0]:
            raise HessrankError(f"{path}: expected a '{schema}' document, found schema={got!r}")
    return data


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write a compressed ``.npz`` of named arrays."""

    def _w(f: Any) -> None:
        np.savez_compressed(f, **arrays)

    return atomic_write(path, _w, mode="wb")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise HessrankError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def ensure_new_or_resumable(out: str | Path, marker: str, resume: bool, overwrite: bool = False) -> Path:
    """Prepare output folder ``out`` without destroying a user's files.

    A folder that holds ``marker`` from an earlier hessrank run is resumed when ``resume`` is true; a folder that
    holds other files is refused unless ``overwrite`` is true.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HessrankError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        ours = (out / marker).exists()
        if not (ours and resume) and not overwrite:
            if ours:
                raise HessrankError(
                    f"{out}: folder holds an earlier hessrank run and --no-resume was given; rerun without "
                    "--no-resume to continue it, pass --overwrite to replace it, or choose another --out"
                )
            theirs = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
            raise HessrankError(
                f"{out}: folder holds files hessrank did not write ({', '.join(theirs[:3])}"
                f"{', ...' if len(theirs) > 3 else ''}); choose another --out, or pass --overwrite to write into it"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def config_from_dict(cls: type[_C], d: dict[str, Any], what: str) -> _C:
    """A stage's config dataclass from its JSON form (the ``config`` of ``*_config.json``, or a ``--config`` file).

    JSON has no tuples: a list given for a field declared ``tuple[...]`` becomes a tuple, and so does
    ``data_options.label_names``; a field the dataclass does not have is refused by name (``what`` names the
    stage in that error). Missing fields take their defaults; the dataclass's own checks then run as usual.
    """
    known = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - set(known)
    if unknown:
        raise HessrankError(f"unknown {what} config field(s): {', '.join(sorted(unknown))}")
    d = {k: tuple(v) if isinstance(v, list) and known[k].startswith("tuple") else v for k, v in d.items()}
    if isinstance(d.get("data_options"), dict):
        opts = dict(d["data_options"])
        if isinstance(opts.get("label_names"), list):
            opts["label_names"] = tuple(opts["label_names"])
        d["data_options"] = opts
    return cls(**d)


def stored_config(
    path: str | Path, normalise: Callable[[dict[str, Any]], dict[str, Any]], what: str, strict: bool
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The configuration document a run folder holds, and its ``config`` read through the stage's dataclass.

    ``normalise`` is ``lambda d: XConfig.from_dict(d).to_dict()``: a folder written before a field was added then
    compares at that field's default instead of differing in it. A configuration the dataclass cannot read (a
    field missing or unknown) is refused, naming the file, when ``strict``; otherwise it compares as written.
    Returns None when the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        return None
    doc = read_json(path)
    raw = dict(doc.get("config") or {})
    try:
        return doc, normalise(raw)
    except (TypeError, HessrankError) as e:
        if strict:
            raise HessrankError(
                f"{path}: not a complete hessrank {what} configuration ({e}); pass --overwrite to replace the run, "
                "or choose another --out"
            ) from None
        return doc, raw


def differing_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two configurations (a key only one of them has differs)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def refuse_other_config(out: str | Path, what: str, diff: list[str]) -> None:
    """The one error every stage gives for a folder that holds ``what`` made under another configuration."""
    raise HessrankError(
        f"{out}: holds {what} with a different configuration (differs in: {', '.join(diff)}); "
        "pass --overwrite to replace it or choose another --out"
    )


def write_config(path: str | Path, schema: str, config: dict[str, Any], **extra: Any) -> None:
    """Write a stage's configuration file: ``{"schema": ..., "config": ..., **extra}`` (docs/schemas.md)."""
    write_json(path, {"schema": schema, "config": config, **extra})


LOCK_FILE = ".hessrank.lock"


@contextlib.contextmanager
def folder_lock(out: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on output folder ``out`` while a stage writes it.

    ``fcntl.flock`` on ``out/.hessrank.lock`` (released by the kernel when the process dies, so a killed run
    leaves no stale lock); a second process that tries to write the same folder gets a clear error naming the pid
    holding it. Where ``fcntl`` does not exist (Windows) the folder is not locked.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HessrankError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        yield out
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise HessrankError(
                f"{out}: another hessrank process is writing this folder ({holder}); wait for it to finish or "
                "choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, hessrank {what}".encode(), 0)
        yield out
    finally:
        os.close(fd)  # closing the descriptor releases the lock
