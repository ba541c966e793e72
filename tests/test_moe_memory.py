"""Issue #22's memory techniques against their references. The FFNs that keep only their SwiGLU inputs
(``set_recompute(..., swiglu=True)``, report §3.3.2): the op against autograd, and the whole model's gradients
with it on and off, in fp32, BF16 and FP8. The router's narrow saved input, FP8 recompute and the FP8 weight
cache without transposes: bitwise.

Bounds, and why: in fp32 the one change is where a routed copy's gate weight multiplies (``w2(g h)`` instead
of ``g w2(h)``), a rounding of about 2^-24 relative per product, which sums keep near that: 1e-5 of each
gradient's largest entry. In BF16 and FP8 the same change rounds at the format's precision; FP8 also
reads the SwiGLU inputs back from 1x128-tile FP8 in backward. There the bound is relative to what the
format already costs: the gradients move from the run without the technique by less than that run's own
gradients differ from fp32 (all gradients as one vector): the technique stays within the format's noise.
(Top-k routing makes both large on a tiny model: one rounding can flip an expert choice downstream.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_fp8
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.models.deepseek_v3.moe import _GateLogits
from haillm.models.deepseek_v3.swiglu import swiglu_keeping_inputs
from haillm.ops import recompute


def _reference(a, b, probs):
    h = F.silu(a) * b
    return h if probs is None else h * probs.unsqueeze(-1).type_as(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_keeping_inputs_against_autograd(dtype):
    """Without gate weights bitwise autograd's ``F.silu(a) * b``, values and gradients; with them the same
    formula, and the gate weight's gradient ``<dh, silu(a) b>`` summed in fp32. ``w2``'s saved input is the
    recipe, recomputed bitwise."""
    gen = torch.Generator().manual_seed(0)
    a, b, dh = (torch.randn(37, 256, generator=gen).to(dtype) for _ in range(3))
    probs = torch.rand(37, generator=gen)
    for p in (None, probs):
        originals = (a, b) if p is None else (a, b, p)
        ins = [t.clone().requires_grad_() for t in originals]
        ref = [t.clone().requires_grad_() for t in originals]
        h, pair = swiglu_keeping_inputs(*ins[:2], ins[2] if p is not None else None)
        h_ref = _reference(*ref[:2], ref[2] if p is not None else None)
        assert pair is None and torch.equal(h, h_ref)
        h.backward(dh)
        h_ref.backward(dh)
        for t, r in zip(ins[:2], ref[:2], strict=True):
            assert torch.equal(t.grad, r.grad)
        if p is not None:  # autograd's sum rounds to bf16 for bf16 inputs, the op's stays fp32
            summed = (dh.float() * (F.silu(a) * b).float()).sum(-1)
            assert torch.equal(ins[2].grad, summed)
            if dtype == torch.float32:  # (bf16 autograd's rounded sum is the less exact one: not a reference)
                torch.testing.assert_close(ins[2].grad, ref[2].grad, rtol=1e-5, atol=1e-6)
        with recompute.keeping_recipes():
            h, _ = swiglu_keeping_inputs(a.clone().requires_grad_(), b, probs)
            y = h.mm(torch.eye(256, dtype=dtype, requires_grad=True))  # saves h for the weight: as its recipe
        recomputed = y.grad_fn._saved_self
        assert torch.equal(recomputed, h) and recomputed.data_ptr() != h.data_ptr()


def _grads(dtype: torch.dtype, fp8: bool, swiglu: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    args = get_preset("tiny").replace(**FP8_TINY_OVERRIDES)
    torch.manual_seed(0)
    model = DeepSeekV3(args).to(dtype)
    apply_fp8(model, fp8)
    model.set_recompute(swiglu, swiglu)
    batch = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    loss = model.compute_loss(batch)["loss"]
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _distance(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all gradients as one vector."""
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    return (diff / sum((b[k] ** 2).sum() for k in b)).sqrt().item()


def test_gradients_with_and_without_swiglu_inputs_only():
    exact_loss, exact = _grads(torch.float32, False, False)
    loss, grads = _grads(torch.float32, False, True)
    assert loss == pytest.approx(exact_loss.item(), rel=1e-6)
    for k in exact:
        err = (grads[k] - exact[k]).abs().max() / exact[k].abs().max().clamp_min(1e-30)
        assert err < 1e-5, (k, err.item())
    for dtype, fp8 in ((torch.bfloat16, False), (torch.float32, True)):
        _, without = _grads(dtype, fp8, False)
        _, with_it = _grads(dtype, fp8, True)
        own, moved = _distance(without, exact), _distance(with_it, without)
        print(f"{dtype} fp8={fp8}: format's own {own:.3e}, the technique's {moved:.3e}")
        assert 0 < moved < own, (dtype, fp8, moved, own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_keeps_its_input_and_gives_autograds_gradients(dtype):
    """The router's logits keep ``x`` and the weight in their own dtype (not fp32 copies) and up-cast them in
    backward: bitwise the gradients of autograd's ``F.linear(x.float(), w.float())``."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 96, generator=gen).to(dtype), torch.randn(16, 96, generator=gen).to(dtype)
    dlogits = torch.randn(50, 16, generator=gen)
    ours = [t.clone().requires_grad_() for t in (x, w)]
    ref = [t.clone().requires_grad_() for t in (x, w)]
    logits = _GateLogits.apply(*ours)
    assert [t.dtype for t in logits.grad_fn.saved_tensors] == [dtype, dtype]
    expected = F.linear(ref[0].float(), ref[1].float())
    assert torch.equal(logits, expected)
    logits.backward(dlogits)
    expected.backward(dlogits)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref, strict=True))


def test_fp8_recompute_and_transposed_cache_change_no_bit():
    """Under FP8, recompute (the norms' FP8 copies and wo's FP8 input recomputed too) and caching the FP8
    weights without their transposes change no loss and no gradient bit."""
    args = get_preset("tiny").replace(**FP8_TINY_OVERRIDES)
    batch = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    runs = []
    for recompute_on, cache_transposed in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = DeepSeekV3(args)
        apply_fp8(model, True, cache_transposed=cache_transposed)
        model.set_recompute(recompute_on)
        loss = model.compute_loss(batch)["loss"]
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
