"""The curvature operator: exact Hessian-vector products of the fine-tuning loss over fixed batches.

:class:`HessianOperator` represents ``H = ∇²_θ L(θ₀)`` for the weighted mean loss

    L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b,

where ``L_b = loss_fn(model, batch_b)`` is the mean loss of batch ``b`` and ``n_b`` the number of items (rows,
or loss tokens for a causal LM) it averages over (:func:`hessrank.engine.tasks.loss_weight`). Re-splitting the same
data into other batches gives the same operator. θ is the parameter *scope*: the weights of the modules LoRA
would adapt (or any list of tensors); all other parameters are held fixed.

HVPs are computed by double backward (Pearlmutter 1994; the "R-operator"): ``Hv = ∇_θ (∇_θ L · v)``. The
gradient graph of each batch is kept between HVPs when memory allows (as PyHessian does), so one HVP costs one
extra backward through it instead of a forward, a backward and a double backward. ``method="forward-over-
reverse"`` uses ``torch.func.jvp`` of ``torch.func.grad`` instead (no graph kept; often lower memory).

The model is put in eval mode (no dropout), so the operator is a fixed symmetric matrix. Scaled-dot-product
attention runs on its MATH backend (:func:`hessrank.models.hvp_safe_attention`), because PyTorch's fused CPU
kernels have no double backward. Tied parameters (SmolLM2's ``lm_head`` is its embedding) are one tensor and
enter the scope once, so their Hessian block sums both uses, as it must.

This module knows nothing about solvers: :mod:`hessrank.engine.lanczos` and :mod:`hessrank.engine.trace` take any object
with ``matvec`` and ``shape``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed import DistContext, shard
from ..errors import NumericalError, ScopeError
from ..models import hvp_safe_attention, linear_modules, resolve_targets
from .tasks import batch_to, loss_weight

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class ParamSlice:
    """Where one parameter tensor lives in the flat vector: ``v[start:stop].view(shape)``."""

    name: str  #: parameter name (first name if tied)
    module: str  #: owning module name ("" for a top-level parameter)
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.stop - self.start


def resolve_params(model: nn.Module, params: Any, include_bias: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Turn ``params`` into an ordered, de-duplicated list of ``(name, tensor)``.

    ``params`` may be tensors, parameter names (``"bert.encoder.layer.2.attention.self.value.weight"``), module
    patterns with PEFT ``target_modules`` semantics (``"value"``, ``["q_proj", "v_proj"]``, ``"all-linear"``,
    ``"re:<regex>"``) whose ``weight`` (and ``bias`` if ``include_bias``) are taken, or ``None`` for every
    parameter that requires grad.
    """
    names_by_id: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), n)
    named = dict(model.named_parameters())
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def add(name: str, t: torch.Tensor) -> None:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))

    if params is None:
        for n, p in named.items():
            if p.requires_grad:
                add(n, p)
        return out
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    strings = [p for p in params if isinstance(p, str)]
    for p in params:
        if isinstance(p, torch.Tensor):
            add(names_by_id.get(id(p), f"param{len(out)}"), p)
        elif isinstance(p, str) and p in named:
            add(p, named[p])
        elif not isinstance(p, str):
            raise ScopeError(f"parameter scope entries must be tensors or names, got {type(p).__name__}")
    patterns = [s for s in strings if s not in named]
    if patterns:
        pat: str | list[str] = patterns[0] if len(patterns) == 1 else patterns
        mods = linear_modules(model)
        for mname in resolve_targets(model, pat):
            mod = mods[mname]
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise ScopeError(
                    f"module '{mname}' has no floating-point weight (quantized?); analyse the unquantized model"
                )
            add(names_by_id.get(id(w), f"{mname}.weight"), w)
            if include_bias and getattr(mod, "bias", None) is not None:
                add(names_by_id.get(id(mod.bias), f"{mname}.bias"), mod.bias)
    if not out:
        raise ScopeError("the parameter scope is empty")
    for n, t in out:
        if not t.is_floating_point():
            raise ScopeError(f"parameter '{n}' is not floating point ({t.dtype}); cannot differentiate it")
    return out


class HessianOperator:
    """The exact Hessian of the mean loss over fixed batches w.r.t. a parameter scope, as a linear operator.

    Parameters
    ----------
    model : the model; put in eval mode.
    loss_fn : ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
    batches : fixed batches (dicts of tensors), moved to the operator's device once.
    params : the scope (see :func:`resolve_params`).
    weights : items per batch; default :func:`hessrank.engine.tasks.loss_weight`.
    keep_graph : keep each batch's gradient graph between HVPs; ``"auto"`` keeps it when the measured graph
        memory times the number of batches fits in half of the free memory.
    method : ``"double-backward"`` or ``"forward-over-reverse"`` (``torch.func``).
    progress : show a progress bar while building graphs.
    dist : a :class:`hessrank.distributed.DistContext` (torchrun): this process keeps only its rank's share of
        ``batches`` (:func:`hessrank.distributed.shard`), weights them by n_b / N with N the items of *all*
        batches, and all-reduces every HVP, the gradient and the loss, so each rank sees the one-process
        operator. ``None`` (default) or a group of one: the one-process operator.

    ``op.matvec(v)`` / ``op @ v`` take flat vectors (or ``n × b`` matrices) on ``op.device``; ``op.shape`` is
    ``(n, n)``; ``op.num_matvecs`` counts HVPs (a matrix of ``b`` columns counts ``b``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        params: Any = None,
        *,
        weights: Sequence[float] | None = None,
        include_bias: bool = False,
        keep_graph: bool | str = "auto",
        method: str = "double-backward",
        hvp_safe: bool = True,
        progress: bool = False,
        dist: DistContext | None = None,
    ) -> None:
        if method not in ("double-backward", "forward-over-reverse"):
            raise ValueError(f"method must be 'double-backward' or 'forward-over-reverse', got {method!r}")
        if not batches:
            raise ScopeError("HessianOperator needs at least one batch")
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.hvp_safe = hvp_safe
        self.progress = progress
        model.eval()
        named = resolve_params(model, params, include_bias=include_bias)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        #: where the flat vectors (and the Krylov basis) live: the first scope parameter's device. A scope spread
        #: over several devices (``device_map``) is split onto each parameter's device for the products.
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        if any(p.dtype != self.dtype for p in self.params):
            raise ScopeError("all parameters in a scope must share one dtype")
        modules_by_param: dict[int, str] = {}
        for mname, mod in model.named_modules():
            for pn, p in mod.named_parameters(recurse=False):
                modules_by_param.setdefault(id(p), mname)
                del pn
        slices, off = [], 0
        for n, p in named:
            slices.append(ParamSlice(n, modules_by_param.get(id(p), ""), off, off + p.numel(), tuple(p.shape)))
            off += p.numel()
        self.slices: list[ParamSlice] = slices
        self.n = off
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        #: indices (into ``batches``) of the batches this process evaluates: all of them, or its rank's share
        self.batch_ids = list(range(len(batches)))
        if self.dist is None:
            self.batches = [batch_to(b, self.device) for b in batches]
            counted: Sequence[Batch] = self.batches
        else:
            self.batch_ids = shard(len(batches), self.dist.world_size, self.dist.rank)
            self.batches = [batch_to(batches[i], self.device) for i in self.batch_ids]
            counted = batches
        w = [float(x) for x in (weights if weights is not None else [loss_weight(b) for b in counted])]
        if len(w) != len(counted):
            raise ScopeError(f"expected one weight per batch ({len(counted)}), got {len(w)}")
        empty = [i for i, x in enumerate(w) if x <= 0]
        if empty:
            raise ScopeError(
                f"batch {empty[0]} has no loss items (for a causal LM: no answer tokens left after "
                "truncation; raise --max-length)"
            )
        total = sum(w)
        # n_b / N with the global N: under torch.distributed each rank's partial sums add up to the full mean
        self.weights = [w[i] / total for i in self.batch_ids]
        self.num_matvecs = 0
        self._graphs: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] | None = None
        self._grad: torch.Tensor | None = None
        self._loss: float | None = None
        if method == "double-backward":
            self._keep = self._decide_keep(keep_graph)
        else:
            self._keep = False

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n={self.n:,}, params={len(self.params)}, batches={len(self.batches)}, "
            f"method={self.method!r}, keep_graph={self._keep}, device={self.device})"
        )

    @property
    def modules(self) -> list[str]:
        """Owning module of each parameter in the scope, in order, without repeats."""
        return list(dict.fromkeys(s.module for s in self.slices))

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector as a list of tensors shaped like the scope's parameters, each on its parameter's device
        (a model placed over several devices with ``device_map``; a no-op move on one device)."""
        return [v[s.start : s.stop].view(s.shape).to(p.device) for s, p in zip(self.slices, self.params)]

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per-parameter tensors (None: zero) as one flat vector on the operator's device."""
        return torch.cat(
            [
                (t if t is not None else torch.zeros_like(p)).reshape(-1).to(self.device)
                for t, p in zip(tensors, self.params)
            ]
        )

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """Only the scope's parameters require grad (cheaper backward); attention is HVP-safe."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for p in self.params:
                p.requires_grad_(True)
            ctx = hvp_safe_attention() if self.hvp_safe else contextlib.nullcontext()
            with ctx:
                yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)

    def _check_loss(self, loss: torch.Tensor, b: int) -> None:
        if loss.dim() != 0:
            raise ScopeError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)} for batch {b}")
        if not torch.isfinite(loss):
            raise NumericalError(
                f"loss is {loss.item()} on batch {b} (scope: {self._scope_name()}); check the data and the model's "
                "dtype"
            )

    def _scope_name(self) -> str:
        mods = self.modules
        return ", ".join(mods[:3]) + (f" and {len(mods) - 3} more module(s)" if len(mods) > 3 else "")

    def _check_vec(self, out: torch.Tensor, what: str, b: int | None = None) -> None:
        if not torch.isfinite(out).all():
            bad = [s.module or s.name for s in self.slices if not torch.isfinite(out[s.start : s.stop]).all()]
            where = f" on batch {b}" if b is not None else ""
            raise NumericalError(f"{what} has NaN/Inf{where} in module(s) {', '.join(bad[:5])}")

    def _batch_grad(self, b: int, create_graph: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with self._scope():
            loss = self.loss_fn(self.model, self.batches[b])
            self._check_loss(loss, self.batch_ids[b])
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        grads = tuple(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params))
        return loss, grads

    # ------------------------------------------------------------------ memory policy
    def _memory_now(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        import psutil

        return int(psutil.Process().memory_info().rss)

    def _memory_free(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        import psutil

        return int(psutil.virtual_memory().available)

    def _decide_keep(self, keep_graph: bool | str) -> bool:
        if keep_graph is True or keep_graph is False:
            return bool(keep_graph)
        if keep_graph != "auto":
            raise ValueError(f"keep_graph must be True, False or 'auto', got {keep_graph!r}")
        before = self._memory_now()
        loss, grads = self._batch_grad(0, create_graph=True)
        used = max(self._memory_now() - before, 1)
        need = used * len(self.batches)
        keep = need < 0.5 * (self._memory_free() + used)
        log.debug(
            "graph memory per batch %.1f MiB, %d batches: keep_graph=%s",
            used / 2**20,
            len(self.batches),
            keep,
        )
        if keep:
            self._graphs = [(loss, grads)]
        del loss, grads
        return keep

    def _build_graphs(self) -> None:
        graphs = list(self._graphs or [])
        it = range(len(graphs), len(self.batches))
        if self.progress and len(it) > 1:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="gradient graphs", leave=False)
        for b in it:
            graphs.append(self._batch_grad(b, create_graph=True))
        self._graphs = graphs
        self._set_grad_from(graphs)

    def _set_grad_from(self, graphs: Sequence[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]) -> None:
        if self._grad is None:
            g = sum(w * self.flatten([x.detach() for x in gr]) for w, (_, gr) in zip(self.weights, graphs))
            loss = sum(w * lo.detach() for w, (lo, _) in zip(self.weights, graphs))
            self._grad, self._loss = self._reduce_grad_loss(g, loss)  # type: ignore[arg-type]

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of a partial sum (the identity in one process)."""
        return t if self.dist is None else self.dist.all_reduce_sum_(t)

    def _reduce_grad_loss(self, g: torch.Tensor, loss: torch.Tensor | float) -> tuple[torch.Tensor, float]:
        """The gradient and the loss summed over ranks in one all-reduce (one process: as given)."""
        if self.dist is None:
            return g, float(loss)
        packed = torch.cat([g.reshape(-1), torch.as_tensor(loss, dtype=g.dtype, device=g.device).reshape(1)])
        self.dist.all_reduce_sum_(packed)
        return packed[:-1].clone(), float(packed[-1])

    # ------------------------------------------------------------------ gradient and loss
    def gradient(self) -> torch.Tensor:
        """∇L at θ₀ (flat, detached): the weighted mean of the batches' gradients."""
        if self._grad is None:
            if self._keep:
                self._build_graphs()
            else:
                g = torch.zeros(self.n, dtype=self.dtype, device=self.device)
                total = 0.0
                for b, w in enumerate(self.weights):
                    loss, grads = self._batch_grad(b, create_graph=False)
                    g += w * self.flatten(grads)
                    total += w * float(loss)
                self._grad, self._loss = self._reduce_grad_loss(g, total)
        assert self._grad is not None
        return self._grad

    def loss(self) -> float:
        """L at θ₀."""
        self.gradient()
        assert self._loss is not None
        return self._loss

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` of length n (returned on the operator's device and dtype)."""
        v = torch.as_tensor(v)
        if v.shape != (self.n,):
            raise ValueError(f"expected a vector of length {self.n}, got shape {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        out = self._hvp_forward_over_reverse(v) if self.method == "forward-over-reverse" else self._hvp_double(v)
        self.num_matvecs += 1
        self._check_vec(out, "Hessian-vector product")
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for an ``n × b`` matrix, column by column."""
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v)

    def _hvp_double(self, v: torch.Tensor) -> torch.Tensor:
        vs = self.split(v)
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        if self._keep:
            if self._graphs is None or len(self._graphs) < len(self.batches):
                self._build_graphs()
            assert self._graphs is not None
            for b, (w, (_, grads)) in enumerate(zip(self.weights, self._graphs)):
                hv = torch.autograd.grad(grads, self.params, grad_outputs=vs, retain_graph=True, allow_unused=True)
                out += w * self._checked(self.flatten(hv), b)
            return self._reduce(out)
        for b, w in enumerate(self.weights):
            _, grads = self._batch_grad(b, create_graph=True)
            hv = torch.autograd.grad(grads, self.params, grad_outputs=vs, allow_unused=True)
            out += w * self._checked(self.flatten(hv), b)
            del grads, hv
        return self._reduce(out)

    def _hvp_forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        from torch.func import grad, jvp
        from torch.nn.utils.stateless import _reparametrize_module

        names = self.param_names
        vs = tuple(self.split(v))
        primals = tuple(p.detach() for p in self.params)
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for b, w in enumerate(self.weights):
            batch = self.batches[b]

            def loss_of(*ps: torch.Tensor, _batch: Batch = batch) -> torch.Tensor:
                with _reparametrize_module(self.model, dict(zip(names, ps)), tie_weights=True):
                    return self.loss_fn(self.model, _batch)

            ctx = hvp_safe_attention() if self.hvp_safe else contextlib.nullcontext()
            with ctx:
                _, hv = jvp(grad(loss_of, argnums=tuple(range(len(primals)))), primals, vs)
            out += w * self._checked(self.flatten(hv), b)
        return self._reduce(out)

    def _checked(self, hv: torch.Tensor, b: int) -> torch.Tensor:
        """One batch's HVP, refused with the batch and module(s) when it holds a NaN/Inf."""
        self._check_vec(hv, "Hessian-vector product", self.batch_ids[b])
        return hv

    # ------------------------------------------------------------------ helpers
    def to_dense(self) -> torch.Tensor:
        """The full n × n matrix (n HVPs; for tests on small problems)."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        cols = [self.matvec(eye[:, j]) for j in range(self.n)]
        return torch.stack(cols, dim=1)

    def as_linear_operator(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for scipy's ``eigsh``."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(t.to(self.dtype)).double().cpu().numpy()

        return LinearOperator((self.n, self.n), matvec=mv, dtype=np.float64)

    def release(self) -> None:
        """Drop kept gradient graphs (frees memory; later HVPs rebuild them)."""
        self._graphs = None
