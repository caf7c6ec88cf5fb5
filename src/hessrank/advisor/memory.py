"""Memory forecast of a LoRA / QLoRA fine-tuning run.

total = runtime + base weights (per format, with quantization constants) + LoRA parameters + their gradients
        + optimizer state + activations (+ logits)

* **Base weights.** Linear layers that bitsandbytes quantizes take :func:`hessrank.engine.quantization.bytes_per_param`
  of their format (NF4: ½ byte + an fp32 absmax per block of 64; double quant: the absmax values in 8 bits);
  everything else (embeddings, norms, heads, modules kept out via ``llm_int8_skip_modules``) stays in the
  compute dtype. A tied output layer is counted once.
* **LoRA** (fp32 adapters, as PEFT creates them): r(m + n) parameters per adapted (m × n) weight; the same again
  for gradients; AdamW keeps two fp32 moments per parameter (8 bytes).
* **Activations** per transformer layer, following Korthikanti et al., *Reducing Activation Recomputation in
  Large Transformer Models* (MLSys 2023), eq. 1: s·b·h·(34 + 5·a·s/h) bytes in 16-bit precision — doubled for
  fp32 compute; with gradient checkpointing only each layer's input (2·s·b·h bytes in 16-bit) plus one layer's
  full set. Causal LMs add the logits and their softmax gradient, 2·b·s·V·4 bytes (fp32 upcast).
* **Runtime**: the process before any model — Python, torch, transformers (``RUNTIME_CPU_BYTES``, measured
  here as the RSS after imports; on CUDA the context is not in the device total).

The forecast is compared with a measured LoRA run's peak RSS in ``tests/test_advisor.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..engine.quantization import bytes_per_param
from ..errors import HessrankError
from .rank import lora_params

#: RSS of a Python process after importing torch, transformers and peft (measured on the reference machine).
RUNTIME_CPU_BYTES = 600 * 2**20

UNITS = {
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_bytes(text: str | int | float) -> int:
    """'6GiB', '6 GB', '512MiB', '1.5g' or a plain number of bytes → bytes."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise HessrankError(f"memory budget must be positive, got {text}")
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :] or "b"
    if unit not in UNITS:
        raise HessrankError(f"memory budget '{text}': unknown unit '{unit}' (use e.g. 6GiB, 512MiB, 8GB)")
    try:
        value = float(num)
    except ValueError:
        raise HessrankError(f"memory budget '{text}' is not a number with a unit (e.g. 6GiB)") from None
    if value <= 0:
        raise HessrankError(f"memory budget must be positive, got '{text}'")
    return int(value * UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Architecture:
    """What the memory model needs to know about a model (``analysis.json`` → ``architecture``)."""

    num_parameters: int
    linear_shapes: dict[str, tuple[int, int]]  #: every linear bitsandbytes would quantize: (out, in)
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int | None  #: None for a classifier (no vocabulary logits)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Architecture:
        return cls(
            num_parameters=int(d["num_parameters"]),
            linear_shapes={k: (int(v[0]), int(v[1])) for k, v in d["linear_shapes"].items()},
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_layers"]),
            num_heads=int(d["num_heads"]),
            vocab_size=None if d.get("vocab_size") is None else int(d["vocab_size"]),
        )


@dataclass(frozen=True)
class MemoryForecast:
    runtime: int
    base_weights: int
    lora_parameters: int
    gradients: int
    optimizer: int
    activations: int
    total: int
    trainable_parameters: int
    assumptions: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_human"] = fmt_bytes(self.total)
        return d


def forecast(
    arch: Architecture,
    quantization: str,
    ranks: dict[str, int],
    shapes: dict[str, Sequence[int]],
    batch_size: int,
    seq_len: int,
    compute_dtype: str = "float32",
    skip_modules: Sequence[str] = (),
    gradient_checkpointing: bool = False,
    device: str = "cpu",
    extra_trainable: int = 0,
) -> MemoryForecast:
    """Forecast peak memory of LoRA fine-tuning with ``ranks`` on ``arch`` loaded in ``quantization``.

    ``quantization``: none | int8 | llm.int8 | nf4 | fp4 | nf4-dq. ``extra_trainable``: fully trained parameters
    beside the adapters (e.g. a classification head).
    """
    if batch_size < 1 or seq_len < 1:
        raise HessrankError("batch size and sequence length must be at least 1")
    dbytes = 2.0 if compute_dtype in ("bfloat16", "float16", "bf16", "fp16") else 4.0
    qfmt = "llm.int8" if quantization == "int8" else quantization
    skip = set(skip_modules)
    lin_params = 0
    base = 0.0
    for name, (o, i) in arch.linear_shapes.items():
        n = o * i
        lin_params += n
        if quantization == "none" or any(name == s or name.endswith("." + s) for s in skip):
            base += n * dbytes
        else:
            base += n * bytes_per_param(qfmt, in_features=i)
    base += max(arch.num_parameters - lin_params, 0) * dbytes
    trainable = sum(lora_params(r, int(shapes[m][0]), int(shapes[m][1])) for m, r in ranks.items() if r > 0)
    trainable += extra_trainable
    lora_b = trainable * 4
    grads = trainable * 4
    optim = trainable * 8
    s, b, h, a, L = seq_len, batch_size, arch.hidden_size, arch.num_heads, arch.num_layers
    per_layer16 = s * b * h * (34 + 5 * a * s / h)
    scale = dbytes / 2.0
    acts = L * 2 * s * b * h * scale + per_layer16 * scale if gradient_checkpointing else L * per_layer16 * scale
    if arch.vocab_size:
        acts += 2 * b * s * arch.vocab_size * 4
    runtime = RUNTIME_CPU_BYTES if device == "cpu" else 0
    total = runtime + base + lora_b + grads + optim + acts
    return MemoryForecast(
        runtime=int(runtime),
        base_weights=int(base),
        lora_parameters=int(lora_b),
        gradients=int(grads),
        optimizer=int(optim),
        activations=int(acts),
        total=int(total),
        trainable_parameters=int(trainable),
        assumptions={
            "quantization": quantization,
            "compute_dtype": compute_dtype,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing,
            "optimizer": "adamw",
            "device": device,
            "skip_modules": sorted(skip),
        },
    )
