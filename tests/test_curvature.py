"""HessianOperator against dense ground truth (torch.func.hessian, float64) and finite differences."""

from __future__ import annotations

import pytest
import torch

from cases import CASES
from fixtures import dense_hessian, tiny_bert, tiny_llama, tiny_mlp
from hessrank.engine.curvature import HessianOperator, resolve_params
from hessrank.errors import NumericalError, ScopeError

LLAMA_SCOPE = [
    "model.embed_tokens.weight",  # tied with lm_head: enters the scope once, both uses counted
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("keep_graph", [True, False])
def test_mlp_dense_hessian(keep_graph):
    model, batches, loss = tiny_mlp()
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    op = HessianOperator(model, loss, batches, params=names, keep_graph=keep_graph)
    H = dense_hessian(model, loss, batches, names).detach()
    assert op.shape == (H.shape[0], H.shape[0])
    assert rel_err(op.to_dense(), H) < 1e-12
    assert op.num_matvecs == H.shape[0]


@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse"])
def test_tiny_transformer_with_padding_and_tied_weights(method):
    model, batches, loss = tiny_llama()
    op = HessianOperator(model, loss, batches, params=LLAMA_SCOPE, method=method)
    H = dense_hessian(model, loss, batches, LLAMA_SCOPE).detach()
    Hop = op.to_dense()
    # Llama's eager attention takes its softmax in float32 even for float64 inputs, hence 1e-8 and not 1e-12
    assert rel_err(Hop, H) < 1e-8
    assert rel_err(Hop, Hop.T) < 1e-8


def test_tied_weights_count_both_uses():
    """Untying the embedding changes the Hessian: the operator must see the lm_head use of the tensor too."""
    model, batches, loss = tiny_llama()
    emb = ["model.embed_tokens.weight"]
    H_tied = HessianOperator(model, loss, batches, params=emb).to_dense()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    H_untied = HessianOperator(model, loss, batches, params=emb).to_dense()
    assert rel_err(H_untied, H_tied) > 1e-3


def test_bert_classifier_eval_mode_and_dense():
    model, batches, loss = tiny_bert()
    model.train()  # dropout 0.3: the operator must switch it off
    names = ["bert.encoder.layer.0.attention.self.value.weight", "classifier.weight"]
    op = HessianOperator(model, loss, batches, params=names)
    assert not model.training
    H = dense_hessian(model, loss, batches, names).detach()
    assert rel_err(op.to_dense(), H) < 1e-10


@pytest.mark.parametrize(
    "fixture,scope,eps,tol",
    [
        (tiny_bert, ["query", "value"], 1e-5, 1e-7),
        # Llama's float32 softmax adds ~1e-9 noise to gradients: a larger step keeps it below the tolerance
        (tiny_llama, ["q_proj", "v_proj"], 1e-3, 1e-4),
    ],
)
def test_finite_differences_of_gradient(fixture, scope, eps, tol):
    model, batches, loss = fixture()
    op = HessianOperator(model, loss, batches, params=scope)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.n, generator=g, dtype=torch.float64)
    v /= v.norm()
    hv = op.matvec(v)

    def grad_at(shift: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(op.params, op.split(v)):
                p.add_(shift * d)
        fresh = HessianOperator(model, loss, batches, params=scope, keep_graph=False)
        out = fresh.gradient().clone()
        with torch.no_grad():
            for p, d in zip(op.params, op.split(v)):
                p.sub_(shift * d)
        return out

    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert rel_err(fd, hv) < tol


def test_batch_splitting_invariance_causal_tokens():
    model, batches, loss = tiny_llama(rows=6, batch_size=3)
    _, one, _ = tiny_llama(rows=6, batch_size=6)
    _, uneven, _ = tiny_llama(rows=6, batch_size=4)  # 4 + 2 rows, different token counts per batch
    v = torch.randn(HessianOperator(model, loss, batches, params=LLAMA_SCOPE).n, dtype=torch.float64)
    ref = HessianOperator(model, loss, one, params=LLAMA_SCOPE).matvec(v)
    for bs in (batches, uneven):
        # equal up to the float32 softmax inside Llama's eager attention
        assert rel_err(HessianOperator(model, loss, bs, params=LLAMA_SCOPE).matvec(v), ref) < 1e-8


def test_sdpa_model_works_through_math_backend():
    model, batches, loss = tiny_llama(dtype=torch.float32, attn="sdpa")
    assert model.config._attn_implementation == "sdpa"
    op = HessianOperator(model, loss, batches, params=["q_proj"])
    v = torch.ones(op.n)
    assert torch.isfinite(op.matvec(v)).all()
    eager, _, _ = tiny_llama(dtype=torch.float32, attn="eager")
    ref = HessianOperator(eager, loss, batches, params=["q_proj"]).matvec(v)
    torch.testing.assert_close(op.matvec(v), ref, rtol=1e-4, atol=1e-6)
    # without the MATH backend the fused CPU kernel has no double backward
    raw = HessianOperator(model, loss, batches, params=["q_proj"], hvp_safe=False, keep_graph=False)
    with pytest.raises(RuntimeError, match=r"derivative|not implemented"):
        raw.matvec(v)


def test_gradient_and_loss_are_weighted_means():
    model, batches, loss = tiny_mlp()
    op = HessianOperator(model, loss, batches, params=["fc2.weight"])
    full = {"x": torch.cat([b["x"] for b in batches]), "labels": torch.cat([b["labels"] for b in batches])}
    ref_loss = loss(model, full)
    ref_grad = torch.autograd.grad(ref_loss, [model.fc2.weight])[0].reshape(-1)
    assert abs(op.loss() - ref_loss.item()) < 1e-12
    torch.testing.assert_close(op.gradient(), ref_grad, rtol=1e-10, atol=1e-12)


def test_scope_errors_and_nan_reporting():
    model, batches, loss = tiny_mlp()
    with pytest.raises(ScopeError, match="matches no linear module"):
        HessianOperator(model, loss, batches, params=["q_proj"])
    assert [n for n, _ in resolve_params(model, "fc1", include_bias=True)] == ["fc1.weight", "fc1.bias"]
    bad = [dict(b) for b in batches]
    bad[1]["x"] = bad[1]["x"].clone()
    bad[1]["x"][0, 0] = float("nan")
    with pytest.raises(NumericalError, match="batch 1"):
        HessianOperator(model, loss, bad, params=["fc1"], keep_graph=False).gradient()
    op = HessianOperator(model, loss, batches, params=["fc1", "fc2"])
    v = torch.zeros(op.n, dtype=torch.float64)
    v[op.slices[1].start] = float("inf")
    with pytest.raises(NumericalError, match="fc"):
        op.matvec(v)
    with pytest.raises(ValueError, match="length"):
        op.matvec(torch.zeros(3, dtype=torch.float64))


def test_scipy_linear_operator_adapter():
    import numpy as np

    model, batches, loss = tiny_mlp()
    op = HessianOperator(model, loss, batches, params=["fc1"])
    lo = op.as_linear_operator()
    x = np.ones(op.n)
    np.testing.assert_allclose(lo.matvec(x), op.matvec(torch.ones(op.n, dtype=torch.float64)).numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_scope_over_two_devices_matches_one_device():
    """A model placed over two devices (as ``device_map`` does): fc1 on the GPU, fc2 on the CPU. The flat vectors
    live on the first scope parameter's device and are split onto each parameter's device for the products; the
    Hessian equals the one-device dense ground truth (float64)."""
    from fixtures import MLP

    model, batches, loss = tiny_mlp()
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    H = dense_hessian(model, loss, batches, names).detach()

    class TwoDevices(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.fc1(x.to(self.fc1.weight.device)))
            return self.fc2(h.to(self.fc2.weight.device))

    split = TwoDevices().to(torch.float64)
    split.load_state_dict(model.state_dict())
    split.fc1.to("cuda")

    def split_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = m(batch["x"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))

    op = HessianOperator(split, split_loss, batches, params=names)
    assert op.device.type == "cuda"
    assert rel_err(op.to_dense().cpu(), H) < 1e-12
    assert rel_err(op.gradient().cpu(), HessianOperator(model, loss, batches, params=names).gradient()) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_matrix_operator_equals_dense_float64_hessian(case):
    """Every model × loss × dtype of tests/cases.py: the operator's dense matrix (one HVP per basis vector) is the
    float64 ground truth within the dtype's tolerance, and symmetric."""
    model, batches, loss, scope = case.problem()
    op = HessianOperator(model, loss, batches, params=scope)
    H = case.dense(op.param_names)
    Hop = op.to_dense().to(torch.float64)
    assert Hop.shape == H.shape
    assert rel_err(Hop, H) < case.hvp_tol
    assert rel_err(Hop, Hop.T) < max(case.hvp_tol, 1e-12)
