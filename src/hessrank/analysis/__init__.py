"""Analysis: scopes (module, group, joint), repeats for error bars, and ``analysis.json``.

* :mod:`.config` — :class:`AnalysisConfig` and the fixed grids (``NEWTON_Z``, ``RANK_GRID``);
* :mod:`.scope` — measuring one scope: Lanczos, SLQ, Hutch++ and the Newton-step quantities;
* :mod:`.run` — :func:`analyze`: set-up, the units (one file per repeat and scope) and resuming;
* :mod:`.aggregate` — ``analysis.json`` from the units; :func:`load_analysis`, :func:`summary_lines`;
* :mod:`.pilot` — the opt-in pilot LoRA run and its measured truncations.
"""

from __future__ import annotations

from .aggregate import _architecture, load_analysis, summary_lines
from .config import CONFIG_FILE, NEWTON_Z, RANK_GRID, SCHEMA, SCOPES, AnalysisConfig
from .run import analyze
from .scope import _plan_krylov_basis, kfac_exact_check, measure_scope, newton_module_quantities

__all__ = [
    "CONFIG_FILE",
    "NEWTON_Z",
    "RANK_GRID",
    "SCHEMA",
    "SCOPES",
    "AnalysisConfig",
    "_architecture",
    "_plan_krylov_basis",
    "analyze",
    "kfac_exact_check",
    "load_analysis",
    "measure_scope",
    "newton_module_quantities",
    "summary_lines",
]
