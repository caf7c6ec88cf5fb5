from __future__ import annotations

import pytest
import torch

from hessrank.errors import ModelError, ScopeError
from hessrank.models import (
    BUNDLED_MODELS,
    describe_model,
    load_model,
    resolve_model,
    resolve_targets,
    resolve_task,
    target_candidates,
)


def test_registry_names():
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "minilm-l6"}


def test_resolve_task_bundled_local_and_explicit(tmp_path):
    # a bundled name: its own task; a local folder (or hub id): causal-lm; an explicit task always wins
    assert resolve_task("minilm-l6") == "seq-cls"
    assert resolve_task("smollm2-135m", None) == "causal-lm"
    assert resolve_task(tmp_path) == "causal-lm"
    assert resolve_task(str(tmp_path), "seq-cls") == "seq-cls"
    assert resolve_task("minilm-l6", "causal-lm") == "causal-lm"


@pytest.mark.slow
def test_smollm2_loads_as_llama_with_tied_embeddings(smollm2):
    m = smollm2.model
    d = describe_model(m)
    assert d["class"] == "LlamaForCausalLM"
    assert d["num_parameters"] == 134_515_008
    assert d["num_layers"] == 30 and d["hidden_size"] == 576
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert (smollm2.path / "model.safetensors").is_file()
    assert "Q4_1" in (smollm2.path / "HESSRANK_SOURCE.txt").read_text()
    names = {g.name for g in target_candidates(m)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    # the model produces sensible text-like predictions: loss on a plain sentence far below uniform (ln 49152 = 10.8)
    tok = smollm2.tokenizer
    x = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        loss = m(**x, labels=x["input_ids"]).loss
    assert loss.item() < 5.0


@pytest.mark.slow
def test_minilm_seq_cls_head_is_seeded(minilm_cls):
    m = minilm_cls.model
    d = describe_model(m)
    assert d["class"] == "BertForSequenceClassification"
    assert 22_000_000 < d["num_parameters"] < 23_000_000
    assert m.classifier.out_features == 2
    same = load_model("minilm-l6", "seq-cls", num_labels=2, seed=0).model
    other = load_model("minilm-l6", "seq-cls", num_labels=2, seed=1).model
    assert torch.equal(same.classifier.weight, m.classifier.weight)
    assert not torch.equal(other.classifier.weight, m.classifier.weight)
    # body weights are the pretrained ones, identical across seeds
    assert torch.equal(
        other.bert.encoder.layer[0].attention.self.query.weight,
        m.bert.encoder.layer[0].attention.self.query.weight,
    )


@pytest.mark.slow
def test_resolve_targets_matches_peft(minilm_cls):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    m = minilm_cls.model
    for pattern in (["query", "value"], ["dense"], ".*layer\\.0\\..*(query|key)"):
        ours = resolve_targets(m, pattern)
        cfg = LoraConfig(target_modules=pattern)
        linear = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        theirs = [n for n in linear if check_target_module_exists(cfg, n)]
        assert ours == theirs, pattern
    assert resolve_targets(m, "query,value") == resolve_targets(m, ["query", "value"])
    al = resolve_targets(m, "all-linear")
    assert "classifier" not in al and len(al) == 37
    with pytest.raises(ScopeError, match="q_proj"):
        resolve_targets(m, "q_proj")
    with pytest.raises(ScopeError, match="not a valid regular expression"):
        resolve_targets(m, "re:(")


@pytest.mark.slow
def test_all_linear_excludes_lm_head(smollm2):
    names = resolve_targets(smollm2.model, "all-linear")
    assert len(names) == 210 and not any("lm_head" in n for n in names)


def _lora_step_all_grads(model, tok):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B != 0, so A gets a gradient on the first step too (PEFT's default B = 0 would
    # give A a zero gradient at step 0 for a legitimate reason and hide the trap this test is about)
    pm = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    )
    x = tok(["Hello, my name is John and", "The capital of France is"], return_tensors="pt", padding=True)
    pm.eval()
    with torch.no_grad():  # the eval-mode forward without grad that triggers bitsandbytes' CPU repacking
        pm(**x)
    pm.train()
    out = pm(**x, labels=x["input_ids"])
    out.loss.backward()
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(lora) == 4 * 30
    zero = [n for n, p in lora.items() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not zero, f"LoRA tensors without gradient: {zero[:4]}"
    return out.loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_lora_step_every_tensor_gets_gradient(quant, smollm2_tokenizer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model("smollm2-135m", "causal-lm", quantization=quant, double_quant=(quant == "nf4"))
        q = lm.model.model.layers[0].self_attn.q_proj
        import bitsandbytes as bnb

        if quant == "nf4":
            assert isinstance(q, bnb.nn.Linear4bit)
            assert lm.info["bnb_cpu_fixed_modules"] == 210
            assert all(not m.support_avx512bf16_for_cpu for m in lm.model.modules() if isinstance(m, bnb.nn.Linear4bit))
        else:
            assert isinstance(q, bnb.nn.Linear8bitLt)
        loss = _lora_step_all_grads(lm.model, smollm2_tokenizer)
    assert 0 < loss < 20


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ModelError, match="not a bundled model"):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(f)
    with pytest.raises(ModelError, match="quantization 'int3'"):
        load_model("minilm-l6", "seq-cls", quantization="int3")
    with pytest.raises(ModelError, match="task 'regression'"):
        load_model("minilm-l6", "regression")
    with pytest.raises(ModelError, match="dtype 'float8'"):
        load_model("minilm-l6", "seq-cls", dtype="float8")


def test_int8_cast_notice_dropped_other_bnb_messages_kept(caplog):
    import logging

    from hessrank.models import quiet_int8_cast_notice

    bnb_functions = pytest.importorskip("bitsandbytes.autograd._functions")
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    assert bnb_functions.logger is lg  # the logger bitsandbytes really writes the notice to
    quiet_int8_cast_notice()
    quiet_int8_cast_notice()  # idempotent
    with caplog.at_level(logging.WARNING, logger=lg.name):
        lg.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        lg.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    assert sum(type(f).__name__ == "_DropInt8CastNotice" for f in lg.filters) == 1
