"""The engine: the Hessian operator and the solvers and estimators on it, knowing nothing of runs or advice.

* :mod:`.curvature` — :class:`HessianOperator`, exact Hessian-vector products of the loss over a scope of parameters;
* :mod:`.lanczos` — Lanczos eigenpairs and stochastic Lanczos quadrature (the spectral density);
* :mod:`.trace` — Hutchinson and Hutch++ trace estimators; :mod:`.spectrum` — effective dimensions;
* :mod:`.kfac` — K-FAC statistics and rank curves; :mod:`.quantization` — the quantization sensitivity;
* :mod:`.tasks` — the losses per task; :mod:`.probe` — the linear-probe head fitted before the analysis;
* :mod:`.lowrank` — the rank grid, LoRA parameter counts and the greedy rank allocation on module curves.

It imports only the shared modules (``models``, ``data``, ``errors``, ``distributed``), never ``analysis``,
``advisor`` or ``trainer``.
"""
