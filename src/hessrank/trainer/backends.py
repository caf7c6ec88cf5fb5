"""Where a validation's training runs execute: in this process (``local``, the default) or as Ray tasks.

A validation (:mod:`hessrank.trainer.validate`) is many independent :func:`hessrank.trainer.train.train` runs, each in
its own folder ``VAL/runs/<name>``. The validation logic — which runs exist, which reuse an identical earlier run, which
are extended, the verdict — stays in :class:`hessrank.trainer.validate._Runner` and is the same for every backend.
A backend only gets a *batch* of runs that logic is about to train and may train them ahead, in parallel:

* :class:`LocalBackend` does nothing ahead; the runner trains each run in turn (the behaviour without Ray).
* :class:`RayBackend` submits the batch as Ray tasks (one run per task, ``num_cpus``/``num_gpus`` each), each
  calling the same ``train(cfg, folder, resume=True, overwrite=...)`` the runner calls, and waits for all. The
  runner then calls ``train`` on each folder as before, which finds the finished ``metrics.json`` and returns it
  (train's own resume rules), so ``validation.json`` is the one the local backend writes. A task that fails
  is left to the runner, which retries it in process and records its error exactly as the local backend does.

Run folders must be on a file system every Ray worker sees (one machine, or a shared mount).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HessrankError

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")

#: (run name, TrainConfig, run folder, overwrite the folder when it trained another configuration)
Job = tuple[str, Any, Path, bool]


class LocalBackend:
    """Runs train in the calling process, one after another (nothing is done ahead)."""

    name = "local"

    def prefetch(self, jobs: Sequence[Job]) -> dict[str, str]:
        return {}


def _train_job(cfg_dict: dict[str, Any], folder: str, overwrite: bool) -> tuple[str, str | None]:
    """One run inside a Ray worker: ``(folder, None)`` on success, ``(folder, error)`` otherwise."""
    from .train import TrainConfig, train

    try:
        train(TrainConfig.from_dict(cfg_dict), folder, resume=True, overwrite=overwrite, progress=False)
    except HessrankError as e:
        return folder, str(e)
    return folder, None


@dataclass
class RayBackend:
    """Trains each batch of runs as parallel Ray tasks.

    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``) or ``None``: use the cluster this process
    is already connected to, else ``RAY_ADDRESS``, else start a local one. ``num_cpus`` / ``num_gpus``: the
    resources one run asks for (so a 16-core machine with ``num_cpus=4`` trains 4 runs at a time). Each worker
    runs torch with ``num_cpus`` threads (``OMP_NUM_THREADS``).
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    name: str = "ray"

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise HessrankError(
                "--backend ray needs Ray: pip install 'hessrank[ray]' (or 'ray>=2.9'); the default --backend local "
                "needs nothing"
            ) from None
        if not ray.is_initialized():
            threads = str(max(1, int(self.num_cpus)))
            env = {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
            if os.environ.get("HF_HUB_OFFLINE"):
                env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
            ray.init(address=self.address or os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env})
        return ray

    def prefetch(self, jobs: Sequence[Job]) -> dict[str, str]:
        """Train ``jobs`` as Ray tasks and wait for all; returns {run name: error} of the failed ones."""
        if not jobs:
            return {}
        ray = self._ray()
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_train_job)
        refs = {task.remote(tc.to_dict(), str(folder), over): name for name, tc, folder, over in jobs}
        log.info("ray: %d run(s) submitted (%g CPU, %g GPU each)", len(refs), self.num_cpus, self.num_gpus)
        errors: dict[str, str] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = refs[ready[0]]
            try:
                _, err = ray.get(ready[0])
            except Exception as e:  # a crashed worker: the runner retries the run in process
                err = f"{type(e).__name__}: {e}"
            if err is not None:
                errors[name] = err
                log.warning("ray: run %s failed in its task (%s); it is retried in process", name, err)
            else:
                log.info("ray: run %s finished (%d still running)", name, len(pending))
        return errors


def make_backend(name: str = "local", **options: Any) -> LocalBackend | RayBackend:
    """The backend called ``name`` (:data:`BACKENDS`); ``options`` go to :class:`RayBackend`."""
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend(**{k: v for k, v in options.items() if v is not None})
    raise HessrankError(f"backend '{name}' is not one of {', '.join(BACKENDS)}")
