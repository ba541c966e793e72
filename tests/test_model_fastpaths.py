"""The model's hand-written fast paths against the obvious autograd compositions they replace."""

import pytest
import torch
import torch.nn.functional as F

import haillm.ops.linear as linear_mod
from haillm.ops import Linear, RMSNorm, deferring_weight_grads
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


HEAD_MODES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "autocast": (torch.float32, True)}
# CE_WGRAD_BYTES_PER_TOKEN: 0 always recomputes the logits in backward, 1 GiB always computes the gradients
# in forward (ce_grads_in_forward)
HEAD_WAYS = {"recompute": 0, "grads_in_forward": 1 << 30}


@pytest.mark.parametrize("way", list(HEAD_WAYS))
@pytest.mark.parametrize("mode", list(HEAD_MODES))
def test_fused_head_against_float64_reference_with_and_without_weight_grad_deferral(mode, way, monkeypatch):
    """Loss, input and weight gradients of ``Linear.cross_entropy_sum`` against ``F.cross_entropy`` in fp64 on
    the same (rounded) operands, over three row blocks (150 rows, 64 per block), with a loss gradient other
    than 1, both ways of the head. Deferral computes the same numbers, bitwise: the I backward leaves the
    weight alone (ZeRO-1's fp32 ``main_grad`` for bf16 parameters), the queued W phase adds the gradient of
    the undeferred head."""
    dtype, autocast = HEAD_MODES[mode]
    monkeypatch.setattr(linear_mod, "CE_BLOCK_BYTES", 0)  # the 64-row minimum: 150 rows -> 3 blocks
    monkeypatch.setattr(linear_mod, "CE_WGRAD_BYTES_PER_TOKEN", HEAD_WAYS[way])
    head, x, targets = _head_and_batch(vocab=97, rows=150, dim=48)
    head.to(dtype)
    x = x.to(dtype)
    ref_x, ref_w = x.double().requires_grad_(), head.weight.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(ref_x, ref_w), targets, reduction="sum")
    (0.37 * ref).backward()
    results = {}
    for deferred in (False, True):
        head.weight.grad = None
        if deferred and dtype == torch.bfloat16:
            head.weight.main_grad = torch.zeros(head.weight.shape)
        head.defer_wgrad = deferred
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head.cross_entropy_sum(xi.view(6, 25, -1), targets.view(6, 25))
            with deferring_weight_grads() as queue:
                (0.37 * loss).backward()
        assert len(queue) == int(deferred) and (head.weight.grad is None) == deferred
        for fn in queue:
            fn()
        dw = head.weight.__dict__.pop("main_grad", None)
        results[deferred] = (loss.detach(), xi.grad, head.weight.grad if dw is None else dw)
    assert results[True][2].dtype == torch.float32
    assert torch.equal(results[True][2], results[False][2].float())
    for a, b in zip(results[True][:2], results[False][:2], strict=True):
        assert torch.equal(a, b)
    loss, dx, dw = results[False]
    assert loss.dtype == torch.float32 and dx.dtype == x.dtype and dw.dtype == head.weight.dtype
    tol = 1e-5 if mode == "fp32" else 2e-2  # relative to the largest entry; bf16: logits and grads rounded
    for got, want in ((loss, ref), (dx, ref_x.grad), (dw, ref_w.grad)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_ways_agree(dtype, monkeypatch):
    """Gradients computed in forward and scaled in backward against the recompute way, which is bitwise the
    former kept-logits head: equal for a power-of-two loss gradient, else within rounding (fp32: 1e-5 of the
    largest entry, measured ~2e-6; bf16: 2e-2, about two bf16 ulps, measured ~9e-3)."""
    monkeypatch.setattr(linear_mod, "CE_BLOCK_BYTES", 0)
    head, x, targets = _head_and_batch(vocab=97, rows=150, dim=48)
    x, w = x.to(dtype), head.weight.detach().to(dtype)
    for scale in (0.25, 0.37):
        results = []
        for grads_in_forward in (False, True):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            (scale * LinearCrossEntropySum.apply(xi, wi, targets, False, grads_in_forward)).backward()
            results.append((xi.grad, wi.grad))
        for a, b in zip(*results, strict=True):
            if scale == 0.25:
                assert torch.equal(a, b)
            else:
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("way", list(HEAD_WAYS))
def test_fused_head_keeps_nothing_vocabulary_wide_per_token(way, deferred, monkeypatch):
    """What the head keeps for backward, by storage: recomputing, its input, the targets and two fp32 numbers
    per token; with the gradients computed in forward, the input gradient and the fp32 weight gradient, at
    most ``CE_WGRAD_BYTES_PER_TOKEN`` per token. With deferral the W phase holds on to exactly that until
    it has run."""
    monkeypatch.setattr(linear_mod, "CE_WGRAD_BYTES_PER_TOKEN", 4 << 10 if way == "grads_in_forward" else 512)
    vocab, dim, rows = 4096, 16, 256  # the weight gradient: 1 KB per token
    assert linear_mod.ce_grads_in_forward(vocab, dim, rows) == (way == "grads_in_forward")
    head, x, targets = _head_and_batch(vocab=vocab, rows=rows, dim=dim)
    head.defer_wgrad = deferred
    x.requires_grad_()
    saved = {}  # storage pointer -> the storage (one more reference to it)

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
        return t

    def held_elsewhere() -> int:
        """Bytes of the saved storages still referenced by more than ``saved``, less the gradients (the
        buffer of the gradients computed in forward becomes the weight's ``.grad``)."""
        grads = {g.untyped_storage().data_ptr() for g in (x.grad, head.weight.grad) if g is not None}
        return sum(s.nbytes() for ptr, s in saved.items()
                   if torch._C._storage_Use_Count(s._cdata) > 1 and ptr not in grads)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head.cross_entropy_sum(x * 1, targets.clone().view(16, 16))  # storages only the graph holds
    kept = held_elsewhere()
    assert kept == sum(s.nbytes() for s in saved.values())
    if way == "recompute":
        assert kept == rows * (4 * dim + 8 + 2 * 4)  # x, the int64 target, max and sum of exponentials
    else:
        assert kept == rows * 4 * dim + vocab * dim * 4  # the input and weight gradients
    with deferring_weight_grads() as queue:
        loss.backward()
    del loss
    assert held_elsewhere() == (kept if deferred else 0)  # what waits for W
    assert (head.weight.grad is None) == deferred
    while queue:
        queue.pop()()
    assert held_elsewhere() == 0 and head.weight.grad is not None


def test_head_keeps_at_most_32_kb_per_token_at_deepseek_v3_dims():
    """Issue #22's bound, in the planner's model of the head (``activations.head_bytes``, checked against
    autograd by test_plan_activations): DeepSeek-V3's head in BF16 recomputes at its micro-batch sizes and
    keeps 14,344 bytes per token, and would stay under 32 KB per token computing its gradients in forward."""
    from haillm.models.deepseek_v3.args import get_preset
    from haillm.tools.activations import ActivationSetup, head_bytes

    v3, bf16 = get_preset("v3_671b"), ActivationSetup(act_bytes=2)
    assert not linear_mod.ce_grads_in_forward(v3.vocab_size, v3.dim, 4096)
    for tokens in (4096, 16 * 4096, 1 << 18, 1 << 20):
        own = head_bytes(v3, bf16, tokens) / tokens - (v3.dim * 2 + 4)  # less the final norm's input and rstd
        assert own <= 32 << 10, tokens
    assert head_bytes(v3, bf16, 4096) / 4096 - (v3.dim * 2 + 4) == 14_344
    small = get_preset("small")
    assert linear_mod.ce_grads_in_forward(small.vocab_size, small.dim, 4 * 256)  # bench/model_throughput's batch
