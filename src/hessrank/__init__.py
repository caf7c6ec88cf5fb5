"""hessrank: choose LoRA rank and weight bit width from the Hessian spectrum of the fine-tuning loss.

Three calls to a result::

    lm = hessrank.load_model("minilm-l6", "seq-cls")
    op = hessrank.HessianOperator(lm.model, loss_fn, batches, params=["value"])
    res = hessrank.lanczos(op, k=10, seed=0)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .data import (
    Dataset,
    DataSpec,
    Encoder,
    Example,
    analysis_batches,
    load_dataset,
    make_batches,
    split_dataset,
)
from .errors import DataError, HessrankError, ModelError, NumericalError, ScopeError
from .models import (
    BUNDLED_MODELS,
    LoadedModel,
    load_model,
    load_tokenizer,
    resolve_targets,
    target_candidates,
)
from .tasks import causal_lm_loss, loss_fn_for, loss_weight, seq_cls_loss

__all__ = [
    "BUNDLED_MODELS",
    "DataError",
    "DataSpec",
    "Dataset",
    "Encoder",
    "Example",
    "HessrankError",
    "LoadedModel",
    "ModelError",
    "NumericalError",
    "ScopeError",
    "__version__",
    "analysis_batches",
    "causal_lm_loss",
    "load_dataset",
    "load_model",
    "load_tokenizer",
    "loss_fn_for",
    "loss_weight",
    "make_batches",
    "resolve_targets",
    "seq_cls_loss",
    "split_dataset",
    "target_candidates",
]
