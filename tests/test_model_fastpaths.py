"""The model's hand-written fast paths against the obvious autograd compositions they replace."""

import pytest
import torch
import torch.nn.functional as F

import haillm.models.deepseek_v3.moe as moe_mod
import haillm.ops.linear as linear_mod
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.models.deepseek_v3.model import init_weights
from haillm.models.deepseek_v3.moe import MLP
from haillm.ops import Linear, RMSNorm
from haillm.ops.linear import LinearCrossEntropySum
from haillm.ops.norm import _RMSNormFn


def test_rms_norm_forward_is_bitwise_f_rms_norm_and_grads_match():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    x = (3 * torch.randn(2, 5, 64, generator=gen))[..., 8:56].requires_grad_()  # a strided view, as in MLA
    g = torch.randn(2, 5, 48, generator=gen)
    y = norm(x)
    (y * g).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    y_ref = F.rms_norm(x_ref, (48,), w_ref, 1e-6)
    (y_ref * g).sum().backward()
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_rms_norm_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(16, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x, w))


def _head_and_batch(vocab: int, rows: int, dim: int = 24, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    head = Linear(dim, vocab)
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=gen)
    x = torch.randn(rows, dim, generator=gen)
    return head, x, torch.randint(vocab, (rows,), generator=gen)


def test_linear_cross_entropy_matches_f_cross_entropy_across_row_blocks(monkeypatch):
    monkeypatch.setattr(linear_mod, "CE_BLOCK_BYTES", 4 * 37 * 64)  # 64-row blocks: 150 rows -> 3 blocks
    head, x, targets = _head_and_batch(vocab=37, rows=150)
    x.requires_grad_()
    loss = head.cross_entropy_sum(x.view(6, 25, -1), targets.view(6, 25))
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(x_ref, w_ref), targets, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_float64_matches_reference_and_backward_runs_once(monkeypatch):
    monkeypatch.setattr(linear_mod, "CE_BLOCK_BYTES", 0)  # the 64-row minimum: 70 rows -> 2 blocks
    _, x, targets = _head_and_batch(vocab=5, rows=70, dim=3)
    w = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x = x.double().requires_grad_()
    loss = LinearCrossEntropySum.apply(x, w, targets)
    dx, dw = torch.autograd.grad(loss, (x, w), retain_graph=True)
    ref = F.cross_entropy(F.linear(x, w), targets, reduction="sum")
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, (x, w))  # backward consumed the kept softmax numerators


def test_linear_cross_entropy_other_precisions_use_the_module_forward():
    head, x, targets = _head_and_batch(vocab=16, rows=8)
    head.set_precision("bf16_emulated")
    expected = F.cross_entropy(head(x), targets, reduction="sum")
    assert torch.equal(head.cross_entropy_sum(x, targets), expected)



def test_grouped_experts_are_bitwise_the_per_expert_loop(monkeypatch):
    args = get_preset("tiny").replace(n_routed_experts=8, n_activated_experts=3)
    moe = DeepSeekV3(args, init_seed=0).layers["1"].ffn
    init_weights(moe, 4, 0.1)
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(40, args.dim, generator=gen), torch.randn(40, args.dim, generator=gen)
    moe.gate.bias[0] = -10.0  # an idle expert: an empty group
    weights, indices, _ = moe.gate(x)
    counts = torch.bincount(indices.flatten(), minlength=args.n_routed_experts)
    assert counts[0] == 0 and counts.sum() == 120
    results = []
    for max_params in (moe_mod.GROUPED_EXPERT_MAX_PARAMS, 0):  # grouped, then the loop
        monkeypatch.setattr(moe_mod, "GROUPED_EXPERT_MAX_PARAMS", max_params)
        xi = x.clone().requires_grad_()
        moe.zero_grad(set_to_none=True)
        y = moe.dispatcher(xi, weights.detach(), indices, counts, moe.experts)
        (y * g).sum().backward()
        results.append([y, xi.grad] + [p.grad for p in moe.experts.parameters()])
    for a, b in zip(*results, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_grouped_experts_only_for_small_plain_experts():
    mlps = [MLP(64, 32) for _ in range(3)]
    rows = torch.zeros(5, 64)
    assert moe_mod._groupable(mlps, rows)
    mlps[1].w2.set_precision("bf16_emulated")
    assert not moe_mod._groupable(mlps, rows)
    assert not moe_mod._groupable([MLP(256, 128)], rows)  # 98K parameters per expert
