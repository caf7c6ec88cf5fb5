"""Data parallelism on ``torch.distributed``: each rank evaluates a share of the analysis batches.

Launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``),
``hessrank analyze`` detects the environment and initialises the default process group once: Gloo when the
analysis runs on the CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). Without ``WORLD_SIZE`` > 1
nothing here is used and the one-process path is unchanged.

The operator is the weighted mean over all B batches, H = Σ_b n_b H_b / Σ_b n_b (n_b the loss items of batch b;
:mod:`hessrank.engine.curvature`). Rank r holds the batches S_r (:func:`shard`, contiguous blocks, disjoint, covering
all B) and computes the partial sum Σ_{b∈S_r} (n_b / N) H_b v with the *global* N = Σ_b n_b, so that one
``all_reduce(SUM)`` gives every rank exactly Hv of the one-process operator (up to the order of the floating
point sum). The gradient and the loss are reduced the same way. The all-reduced vector is bitwise identical on
every rank, so Lanczos, SLQ and Hutch++ (seeded CPU generators, deterministic arithmetic on identical inputs)
run replicated and take the same steps everywhere; :func:`check_replicated` verifies that after every scope
(a rank that diverged would otherwise wait for an HVP the others never ask for).

Only rank 0 writes files; the other ranks learn what rank 0 decided (which units are already done) by
broadcast, so no shared file system is assumed for resume decisions.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import HessrankError

log = logging.getLogger(__name__)

#: Collective timeout: rank 0 alone runs the quantization unit while the others wait at a barrier.
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class DistContext:
    """The process group of this run: ``world_size`` ranks, this one ``rank``, on ``backend``."""

    world_size: int
    rank: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``t``, in place, on every rank."""
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small decisions, not tensors)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_tensors_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (e.g. a fitted probe head)."""
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=0)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise HessrankError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch, and in a plain one-process run."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def from_env(device: torch.device) -> DistContext | None:
    """The process group of a torchrun launch, initialised once; ``None`` for a one-process run.

    ``device`` is the analysis device: CUDA selects NCCL (and ``cuda:LOCAL_RANK``), anything else Gloo. A group
    initialised earlier (by the caller, or a previous analysis in the same process) is reused as it is.
    """
    world = env_world_size()
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise HessrankError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("HESSRANK_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        kw: dict[str, Any] = {}
        if backend == "nccl":
            kw["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, timeout=timeout, **kw)
        global _OWNED
        _OWNED = True
        log.info("torch.distributed: rank %d of %d (%s)", rank, world, backend)
    backend = str(dist.get_backend())
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise HessrankError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with the environment "
            f"(RANK={rank}, WORLD_SIZE={world})"
        )
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, backend=backend)


_OWNED = False  #: whether hessrank initialised the process group (and so may destroy it)


_T = TypeVar("_T")


def run_stage(
    out: Path, what: str, device: torch.device, progress: bool, stage: Callable[[bool, DistContext | None], _T]
) -> _T:
    """Run one pipeline stage writing folder ``out``: ``stage(progress, ctx)`` under the folder's lock.

    One process: ``ctx`` is None. Under torchrun every rank runs the stage with its :class:`DistContext`; rank 0
    alone holds the lock (it alone writes) and shows progress.
    """
    from .io import folder_lock

    if env_world_size() <= 1:
        with folder_lock(out, what):
            return stage(progress, None)
    ctx = from_env(device)
    assert ctx is not None
    if ctx.is_main:
        with folder_lock(out, what):
            return stage(progress, ctx)
    return stage(False, ctx)


def shutdown() -> None:
    """After a successful command: wait for every rank, then destroy the process group hessrank initialised.

    Leaving it to the interpreter's exit lets a rank tear down its Gloo connections while another still reads
    the last broadcast. A group the caller initialised is left alone."""
    global _OWNED
    if not _OWNED:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _OWNED = False


def rank_device(device: torch.device, ctx: DistContext | None) -> torch.device:
    """Under torchrun each rank takes its own GPU (``cuda:LOCAL_RANK``) unless an index was given."""
    if ctx is not None and device.type == "cuda" and device.index is None:
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def shard(num_batches: int, world_size: int, rank: int) -> list[int]:
    """The batches rank ``rank`` evaluates: contiguous, disjoint blocks covering ``range(num_batches)``, sizes
    differing by at most one (``numpy.array_split``)."""
    if num_batches < world_size:
        raise HessrankError(
            f"{num_batches} analysis batch(es) cannot be shared by {world_size} processes; raise --num-batches to "
            f"at least {world_size} or launch fewer processes"
        )
    return [int(i) for i in np.array_split(np.arange(num_batches), world_size)[rank]]


def assignment(num_batches: int, world_size: int) -> dict[str, list[int]]:
    """{rank: batch indices} for the whole group (what ``analysis.json`` records)."""
    return {str(r): shard(num_batches, world_size, r) for r in range(world_size)}


def check_replicated(ctx: DistContext | None, what: str, values: Any) -> None:
    """Refuse results that differ between ranks (the replicated solvers must agree exactly)."""
    if ctx is None:
        return
    got = ctx.all_gather_object(values)
    if any(g != got[0] for g in got[1:]):
        raise HessrankError(f"{what}: the ranks disagree ({got}); the replicated Lanczos runs diverged")
