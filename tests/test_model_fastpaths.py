"""The model's hand-written fast paths against the obvious autograd compositions they replace."""

import pytest
import torch
import torch.nn.functional as F

import haillm.ops.linear as linear_mod
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
