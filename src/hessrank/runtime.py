"""Runtime facts every stage records or needs: the torch device a ``--device`` string names, and the versions of
hessrank and the libraries it runs on (written into ``analysis.json`` and a training run's ``metrics.json``)."""

from __future__ import annotations

import contextlib

import torch

from . import __version__
from .errors import HessrankError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HessrankError(f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HessrankError(f"device '{device}' asked for but CUDA is not available; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HessrankError(
            f"device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s); use --device cuda:0"
        )
    if dev.type not in ("cpu", "cuda"):
        mod = getattr(torch.backends, dev.type, None)
        if mod is None or not getattr(mod, "is_available", lambda: False)():
            raise HessrankError(f"device '{device}' is not available in this torch build; use --device cpu or auto")
    return dev


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"hessrank": __version__}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "scipy", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
