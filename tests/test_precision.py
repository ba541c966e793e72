"""ops.precision: BF16 GEMMs on CPU are fp32 arithmetic on the bf16 operands, rounded to bf16; backward
keeps the bf16 operands (as a GPU's BF16 GEMM does), not their fp32 up-casts, with the same gradients."""

import pytest
import torch
import torch.nn.functional as F
from memory_probe import allocated_during
from saved_tensors import saved_storages

from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops import precision


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).bfloat16()


def test_fp32_is_the_plain_op_bitwise():
    x, w, b = _bf16(5, 8).float(), _bf16(3, 8).float(), _bf16(3).float()
    assert torch.equal(precision.linear(x, w, b), F.linear(x, w, b))
    assert not precision.widens(x, w, b)


def test_bf16_linear_is_fp32_product_rounded_once():
    x, w = _bf16(6, 64), _bf16(16, 64)
    y = precision.linear(x, w)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.float(), w.float()).bfloat16())


def test_bf16_gradients_flow_in_bf16():
    x, w = _bf16(6, 32).requires_grad_(), _bf16(16, 32).requires_grad_()
    precision.linear(x, w).float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    F.linear(xf, wf).bfloat16().float().square().sum().backward()
    assert torch.equal(x.grad, xf.grad.bfloat16()) and torch.equal(w.grad, wf.grad.bfloat16())


def test_mm_out_and_grouped_and_attention_keep_dtype():
    a, b = _bf16(4, 8), _bf16(8, 6)
    out = torch.empty(4, 6, dtype=torch.bfloat16)
    assert precision.mm(a, b, out=out) is out and torch.equal(out, (a.float() @ b.float()).bfloat16())
    x, w = _bf16(10, 16), _bf16(2, 16, 8)
    offs = torch.tensor([4, 10], dtype=torch.int32)
    y = precision.grouped_mm(x, w, offs)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[:4], (x[:4].float() @ w[0].float()).bfloat16())
    assert torch.equal(y[4:], (x[4:].float() @ w[1].float()).bfloat16())
    q = _bf16(1, 2, 5, 8)
    o = precision.attention(q, q, q, 0.5)
    ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True, scale=0.5)
    assert o.dtype == torch.bfloat16 and torch.equal(o, ref.bfloat16())


def _copies(operands) -> bool:
    """For ``precision._keeps_narrow``: the emulation that kept the fp32 up-casts for backward."""
    return False


def _saved(fn, *args):
    """``fn(*args)`` and ``{storage pointer: (dtype, bytes)}`` of every storage autograd saved during it."""
    kept = {}

    def count(t):
        kept[t.untyped_storage().data_ptr()] = t.dtype, t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        out = fn(*args)
    return out, kept


def _ops(g: torch.Generator) -> dict[str, tuple]:
    """Each emulated op on awkward layouts: (function, inputs). Inputs are bf16 leaves needing grad."""

    def leaf(*shape: int, transpose: tuple[int, int] | None = None, narrow: int = 0) -> torch.Tensor:
        t = torch.randn(*shape[:-1], shape[-1] + narrow, generator=g).bfloat16()[..., narrow:]
        return (t if transpose is None else t.transpose(*transpose).contiguous().transpose(*transpose)).requires_grad_()

    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # an empty group in the middle
    return {
        "linear": (precision.linear, (leaf(3, 5, 16), leaf(8, 16))),
        "linear_bias_transposed": (precision.linear, (leaf(5, 16, transpose=(0, 1)), leaf(8, 16), leaf(8))),
        "linear_3d_transposed": (precision.linear, (leaf(3, 5, 16, transpose=(0, 1)), leaf(8, 16))),
        "linear_sliced": (precision.linear, (leaf(3, 5, 16, narrow=4), leaf(8, 16))),
        "linear_2d_transposed_weight": (precision.linear, (leaf(7, 16), leaf(8, 16, transpose=(0, 1)))),
        "matmul_broadcast": (precision.matmul, (leaf(4, 6, 16), leaf(1, 16, 8))),
        "matmul_3d_2d": (precision.matmul, (leaf(4, 6, 16), leaf(16, 8))),
        "mm": (precision.mm, (leaf(6, 16), leaf(16, 8, transpose=(0, 1)))),
        "attention": (lambda q, k, v: precision.attention(q, k, v, 0.3),
                      (leaf(2, 3, 7, 8), leaf(2, 3, 7, 8, transpose=(1, 2)), leaf(2, 3, 7, 8))),
        "grouped_mm": (lambda a, b: precision.grouped_mm(a, b, offs), (leaf(10, 16), leaf(3, 16, 8))),
    }


@pytest.mark.parametrize("name", list(_ops(torch.Generator())))
def test_backward_keeps_bf16_operands_with_the_same_gradients(name, monkeypatch):
    """Outputs and gradients bitwise those of the emulation that kept fp32 copies; what is saved: the bf16
    operands (a parameter-like leaf by reference, no copy), plus whatever else the fp32 op saves."""
    results = {}
    for impl in ("copies", "bf16"):
        with monkeypatch.context() as m:
            if impl == "copies":
                m.setattr(precision, "_keeps_narrow", _copies)
            fn, inputs = _ops(torch.Generator().manual_seed(0))[name]
            y, saved = _saved(fn, *inputs)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
        operands = {t.untyped_storage().data_ptr() for t in inputs}
        results[impl] = [y.detach(), *torch.autograd.grad(y, inputs, dy)], saved, operands
    (copies, saved_copies, operands_copies), (ours, saved_ours, operands) = results["copies"], results["bf16"]
    for a, b in zip(copies, ours, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and a.stride() == b.stride() and torch.equal(a, b)
    fp32 = {ptr: nbytes for ptr, (dtype, nbytes) in saved_ours.items() if dtype == torch.float32}
    assert {ptr for ptr, (dtype, _) in saved_ours.items() if dtype == torch.bfloat16} <= operands
    expected = 0
    if name == "attention":  # the fp32 kernel also saves its fp32 output and log-sum-exp, which backward reads
        expected = 4 * y.numel() + 4 * y[..., 0].numel()
    if name == "linear_3d_transposed":  # F.linear flattens this x by copying its up-cast: that copy stays fp32
        expected = 4 * inputs[0].numel()
    assert sum(fp32.values()) == expected
    assert not operands_copies & saved_copies.keys()  # the emulation before saved fp32 copies only
    assert sum(n for _, n in saved_ours.values()) < sum(n for _, n in saved_copies.values())


def test_operand_modified_in_place_is_refused():
    """Backward reads the bf16 operand itself: an in-place change after the forward is an error (autograd's
    own check would not see it: it saw the up-cast)."""
    x, w = _bf16(4, 8).requires_grad_(), _bf16(3, 8).requires_grad_()
    h = x * 1
    y = precision.linear(h, w)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bf16_model_keeps_bf16_operands_with_the_same_gradients(monkeypatch):
    """A BF16 forward of tiny (recomputation on: the hooks nest in recomputation's and the probe's) keeps
    about a third of the bytes it kept with the fp32 copies (half for the operands, and recomputation now
    drops the norm outputs the GEMMs read, whose copies it could not), as counted by autograd's saved tensors
    and, independently, by the allocator (what the forward left allocated); the gradients are bitwise the
    same."""
    args = get_preset("tiny").replace(mtp_depth=0, n_layers=2)
    model = DeepSeekV3(args, init_seed=0)
    precision.cast_parameters(model, torch.bfloat16)
    model.set_recompute(True)
    batch = torch.randint(args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    measured = {}
    for impl in ("copies", "bf16"):
        with monkeypatch.context() as m:
            if impl == "copies":
                m.setattr(precision, "_keeps_narrow", _copies)
            forward = lambda: model.compute_loss(batch)  # noqa: E731
            resident, (kept, losses) = allocated_during(lambda: saved_storages(model, forward))  # noqa: B023
            losses["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        measured[impl] = resident, sum(kept.values()), losses["loss"].detach(), grads
        model.zero_grad(set_to_none=True)
        model.reset_moe_loads()
    (res_copies, kept_copies, loss_copies, g_copies), (res_ours, kept_ours, loss_ours, g_ours) = measured.values()
    print(f"kept: {kept_copies} -> {kept_ours} bytes ({kept_ours / kept_copies:.3f}); allocated: {res_copies} -> "
          f"{res_ours}")
    assert torch.equal(loss_copies, loss_ours) and g_copies.keys() == g_ours.keys()
    assert all(torch.equal(g_copies[n], g_ours[n]) for n in g_copies)
    for resident, kept in ((res_copies, kept_copies), (res_ours, kept_ours)):
        assert resident == pytest.approx(kept, rel=0.02)
    assert kept_ours < 0.6 * kept_copies
