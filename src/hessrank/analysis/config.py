"""The analysis configuration and the fixed grids every analysis step shares.

* :class:`AnalysisConfig` — everything that determines an analysis (checked on construction, JSON round trip);
* ``SCOPES`` (module, group, joint), ``NEWTON_Z`` (the Newton-step damping z = c·λ_max for c in it) and
  ``RANK_GRID`` (:mod:`hessrank.engine.lowrank`: the ranks the curves are measured on);
* ``SCHEMA`` of ``analysis.json`` and ``CONFIG_FILE``, the configuration written into the output folder;
* :func:`parse_device_map` — ``--device-map``: accelerate's keywords (``DEVICE_MAP_KEYWORDS``) or a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.lowrank import RANK_GRID  # the one grid: curves are measured on the ranks advice is given on
from ..errors import HessrankError
from ..io import config_from_dict

__all__ = [
    "CONFIG_FILE",
    "DEVICE_MAP_KEYWORDS",
    "NEWTON_Z",
    "RANK_GRID",
    "SCHEMA",
    "SCOPES",
    "AnalysisConfig",
    "parse_device_map",
]

SCHEMA = "hessrank.analysis/1"
SCOPES = ("module", "group", "joint")
NEWTON_Z: tuple[float, ...] = (1e-1, 1e-2, 1e-3)
CONFIG_FILE = "analysis_config.json"


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that determines an analysis. Two runs with equal configs give equal results (same seed)."""

    model: str
    data: str
    task: str | None = None
    modules: str = "q_proj,v_proj"
    scopes: tuple[str, ...] = ("joint",)
    top_k: int = 10
    negative_k: int = 2
    tol: float = 1e-3
    max_matvecs: int = 200
    slq_probes: int = 4
    slq_steps: int = 20
    trace_matvecs: int = 0
    batch_size: int = 8
    num_batches: int = 2
    max_length: int = 64
    repeats: int = 1
    seed: int = 0
    num_labels: int | None = None
    eval_fraction: float = 0.1
    probe_examples: int = 512
    device: str = "auto"
    #: accelerate placement for a model larger than one device: auto | balanced | balanced_low_0 | sequential,
    #: or a JSON file of {module: device}; None: the whole model on ``device`` (docs/scaling.md)
    device_map: str | None = None
    dtype: str = "float32"
    keep_graph: str = "auto"
    #: Krylov basis storage (hessrank.engine.lanczos.STORAGES); auto: from the memory estimate
    krylov_storage: str = "auto"
    quant_formats: tuple[str, ...] = ()
    #: random-sign HVPs per format for the per-module quadratic (0: K-FAC's, no HVP; engine.quantization)
    quant_sign_probes: int = 0
    quant_exact: str = "no"
    #: per-module held-out evaluations: auto (when a skip list can help) | all | none (engine.quantization)
    quant_module_evals: str = "auto"
    quant_eval_batches: int = 8
    kfac_batches: int = 16
    kfac_groups: int = 4
    #: opt-in diagnostic: the exact quadratic model along each scope's K-FAC rank-1 and rank-8 steps (two HVPs per
    #: scope and repeat; :func:`hessrank.analysis.scope.kfac_exact_check`). It only adds a sentence to the
    #: explanation, so it is off by default (analyses before this field existed ran it)
    kfac_exact_check: bool = False
    #: the pilot LoRA run (:mod:`hessrank.analysis.pilot`, opt-in): steps (0: none), rank, learning rate, batch,
    #: held-out batches
    pilot_steps: int = 0
    pilot_rank: int = 64
    pilot_lr: float = 1e-3
    pilot_batch_size: int | None = None  #: None: ``batch_size`` (a batch the user already knows fits)
    pilot_eval_batches: int = 8
    data_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.scopes if s not in SCOPES]
        if bad or not self.scopes:
            raise HessrankError(f"scope {bad or self.scopes} is not one of {', '.join(SCOPES)}")
        for name in ("top_k", "batch_size", "num_batches", "repeats", "max_length", "max_matvecs"):
            if getattr(self, name) < 1:
                raise HessrankError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("negative_k", "slq_probes", "trace_matvecs", "probe_examples"):
            if getattr(self, name) < 0:
                raise HessrankError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.slq_probes and self.slq_steps < 2:
            raise HessrankError(f"slq-steps must be at least 2, got {self.slq_steps}")
        if self.trace_matvecs and self.trace_matvecs < 6:
            raise HessrankError(f"trace-matvecs must be 0 or at least 6 (Hutch++), got {self.trace_matvecs}")
        if not 0 < self.tol < 1:
            raise HessrankError(f"tol must be in (0, 1), got {self.tol}")
        from ..engine.quantization import FORMATS

        bad_q = [f for f in self.quant_formats if f not in FORMATS]
        if bad_q:
            raise HessrankError(f"quantization format {bad_q[0]!r} is not one of {', '.join(FORMATS)}")
        from ..engine.lanczos import STORAGES

        if self.krylov_storage not in STORAGES:
            raise HessrankError(f"krylov-storage must be one of {', '.join(STORAGES)}, got {self.krylov_storage!r}")
        if self.device_map is not None:
            parse_device_map(self.device_map)  # a bad keyword or file fails before any work
        if self.quant_exact not in ("auto", "yes", "no"):
            raise HessrankError(f"quant-exact must be auto, yes or no, got {self.quant_exact!r}")
        from ..engine.quantization import MODULE_EVALS

        if self.quant_module_evals not in MODULE_EVALS:
            raise HessrankError(
                f"quant-module-evals must be one of {', '.join(MODULE_EVALS)}, got {self.quant_module_evals!r}"
            )
        if self.quant_sign_probes < 0:
            raise HessrankError(f"quant-sign-probes must be 0 or more, got {self.quant_sign_probes}")
        if self.kfac_groups < 4 or self.kfac_groups % 2:
            raise HessrankError(f"kfac-groups must be an even number >= 4, got {self.kfac_groups}")
        if self.pilot_steps < 0:
            raise HessrankError(f"pilot-steps must be >= 0 (0: no pilot run), got {self.pilot_steps}")
        if self.pilot_steps:
            self.pilot_settings().check()
        if self.kfac_batches < self.kfac_groups:
            raise HessrankError(f"kfac-batches ({self.kfac_batches}) must be at least kfac-groups ({self.kfac_groups})")

    def pilot_settings(self) -> Any:
        from .pilot import PilotSettings

        return PilotSettings(
            steps=max(1, self.pilot_steps),
            rank=self.pilot_rank,
            lr=self.pilot_lr,
            batch_size=self.pilot_batch_size or self.batch_size,
            eval_batches=self.pilot_eval_batches,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-normalised (tuples become lists), so a config read back from disk compares equal."""
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisConfig:
        return config_from_dict(cls, d, "analysis")


DEVICE_MAP_KEYWORDS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str) -> str | dict[str, Any]:
    """``--device-map``: one of accelerate's placement keywords, or a JSON file holding {module name: device}
    (devices as accelerate accepts them: ``0``, ``"cuda:1"``, ``"cpu"``)."""
    if value in DEVICE_MAP_KEYWORDS:
        return value
    path = Path(value)
    if not path.is_file():
        raise HessrankError(
            f"device-map {value!r} is neither one of {', '.join(DEVICE_MAP_KEYWORDS)} nor a JSON file of "
            "{module: device}"
        )
    try:
        placed = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HessrankError(f"device-map file {path}: cannot read it as JSON ({e})") from None
    if not isinstance(placed, dict) or not placed or not all(isinstance(v, (int, str)) for v in placed.values()):
        raise HessrankError(f"device-map file {path}: expected a non-empty JSON object {{module: device}}")
    return placed


def _safe(name: str) -> str:
    """A scope's name as its unit files carry it (``units/r{repeat}__{name}.json`` and ``.npz``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
