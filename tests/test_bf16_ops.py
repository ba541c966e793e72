"""Every custom autograd Function and fused path in BF16 and under autocast, against plain autograd.

Plain autograd is the reference: the same maths written with ordinary torch ops on the same (bf16 or
autocast) inputs. Our fused/custom versions must give the same values and gradients in the same dtypes, up
to bf16 rounding of intermediate results (a relative error of a few 2^-8 on the largest entries).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist import run_distributed
from test_expert import ARGS, bias_gate, ep_setup, make_moe, rank_batch

from haillm.fp8 import calc_diff, fp8_linear
from haillm.models.deepseek_v3 import get_preset
from haillm.ops import Linear, RMSNorm, deferrable_linear, deferring_weight_grads, precision
from haillm.ops.linear import Bf16EmulatedLinear, LinearCrossEntropySum

BF16_TOL = 2e-2  # relative to the largest entry: a handful of bf16 roundings


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = BF16_TOL) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


def leaves(*shapes: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in shapes]


def grads(fn, tensors: list[torch.Tensor], autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for t in tensors:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*tensors)
        torch.manual_seed(1)
        out.float().mul(torch.randn(out.shape)).sum().backward()
    return out.detach(), [t.grad for t in tensors]


def compare(ours, reference, shapes, dtype: torch.dtype, autocast: bool) -> None:
    a, b = leaves(*shapes, dtype=dtype), leaves(*shapes, dtype=dtype)
    out, got = grads(ours, a, autocast)
    ref_out, want = grads(reference, b, autocast)
    close(out, ref_out)
    for g, w in zip(got, want, strict=True):
        close(g, w)


MODES = [pytest.param(torch.bfloat16, False, id="bf16"), pytest.param(torch.float32, True, id="autocast")]


@pytest.mark.parametrize(("dtype", "autocast"), MODES)
def test_rmsnorm(dtype, autocast):
    def reference(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)

    norm = RMSNorm(64)
    compare(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), reference, [(3, 5, 64), (64,)],
            dtype, autocast)


@pytest.mark.parametrize(("dtype", "autocast"), MODES)
def test_fused_head_cross_entropy(dtype, autocast, monkeypatch):
    import haillm.ops.linear as linear_mod

    monkeypatch.setattr(linear_mod, "CE_BLOCK_BYTES", 0)  # 64-row blocks: several, and a partial one
    targets = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(3))
    compare(lambda x, w: LinearCrossEntropySum.apply(x, w, targets) if not autocast else
            precision.apply_like_autocast(LinearCrossEntropySum, x, w, targets),
            lambda x, w: F.cross_entropy(F.linear(x, w).float(), targets, reduction="sum"),
            [(150, 48), (97, 48)], dtype, autocast)


@pytest.mark.parametrize(("dtype", "autocast"), MODES)
def test_head_module_cross_entropy_in_any_dtype(dtype, autocast):
    """``Linear.cross_entropy_sum`` (the model's loss head) takes the fused path in bf16 and under autocast."""
    targets = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    head = Linear(48, 97)

    def ours(x, w):
        head.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
        return head.cross_entropy_sum(x, targets)

    def reference(x, w):
        return F.cross_entropy(F.linear(x, w.detach()).float().flatten(0, 1), targets.flatten(), reduction="sum")

    (x,), (x2,) = leaves((2, 40, 48), dtype=dtype), leaves((2, 40, 48), dtype=dtype)
    (w,) = leaves((97, 48), dtype=dtype, seed=1)
    out, (dx,) = grads(lambda a: ours(a, w), [x], autocast)
    ref, (rdx,) = grads(lambda a: reference(a, w), [x2], autocast)
    assert head.is_plain
    close(out, ref)
    close(dx, rdx)


@pytest.mark.parametrize(("dtype", "autocast"), MODES)
def test_deferrable_linear_immediate_and_deferred(dtype, autocast):
    reference = F.linear
    compare(deferrable_linear, reference, [(2, 7, 32), (24, 32)], dtype, autocast)
    # Deferred: the I backward leaves the weight alone, W accumulates the same gradient into it.
    (x, w), (x2, w2) = leaves((2, 7, 32), (24, 32), dtype=dtype), leaves((2, 7, 32), (24, 32), dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = deferrable_linear(x, w)
        with deferring_weight_grads() as queue:
            y.float().sum().backward()
        assert w.grad is None and len(queue) == 1
        for fn in queue:
            fn()
        deferrable_linear(x2, w2).float().sum().backward()
    assert w.grad.dtype == w.dtype
    close(w.grad, w2.grad, 1e-6)
    close(x.grad, x2.grad, 1e-6)


def test_deferred_weight_grad_accumulates_into_main_grad_in_fp32():
    """Under ZeRO-1 a bf16 parameter has an fp32 ``main_grad``: deferred W adds there, not to a bf16 .grad."""
    (x, w) = leaves((4, 16), (8, 16), dtype=torch.bfloat16)
    w.main_grad = torch.zeros(8, 16)
    with deferring_weight_grads() as queue:
        deferrable_linear(x, w).float().sum().backward()
        deferrable_linear(x, w).float().sum().backward()
    for fn in queue:
        fn()
    assert w.grad is None
    expected = 2 * (torch.ones(4, 8).t() @ x.detach().float())
    close(w.main_grad, expected, 1e-2)


@pytest.mark.parametrize(("dtype", "autocast"), MODES)
def test_bf16_emulated_linear(dtype, autocast):
    compare(lambda x, w: precision.apply_like_autocast(Bf16EmulatedLinear, x, w),
            lambda x, w: F.linear(x.bfloat16(), w.bfloat16()).to(x.dtype) if not autocast else F.linear(x, w),
            [(3, 9, 32), (16, 32)], dtype, autocast)


@pytest.mark.parametrize(("dtype", "autocast"), MODES)
def test_fp8_linear_in_bf16_and_under_autocast(dtype, autocast):
    """FP8 GEMMs from bf16 (or autocast) operands: results and gradients in the operands' dtypes, within FP8's
    error of plain autograd (DeepGEMM's calc_diff < 2e-3; fp32 operands give ~1e-3, see test_fp8_linear)."""
    (x, w), (x2, w2) = leaves((2, 130, 256), (384, 256), dtype=dtype), leaves((2, 130, 256), (384, 256), dtype=dtype)
    out, (dx, dw) = grads(lambda a, b: fp8_linear(a, b), [x, w], autocast)
    ref, (rdx, rdw) = grads(lambda a, b: F.linear(a.float(), b.float()), [x2, w2], False)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert calc_diff(out, ref) < 2e-3 and calc_diff(dx, rdx) < 2e-3 and calc_diff(dw, rdw) < 2e-3


def _ep_bf16_worker(autocast: bool) -> None:
    """The EP dispatcher with bf16 parameters, or fp32 ones under autocast, a rank that receives no tokens
    (bias_gate at ep=4) and one whose experts return another dtype: every rank puts the dtype its tokens
    left in on the wire, and the result matches one process."""
    args = get_preset("tiny").replace(**ARGS)
    world, rank = dist.get_world_size(), dist.get_rank()
    x_all, g_all, mine = rank_batch(args, world, rank)
    ref, (moe, dispatcher) = make_moe(args), ep_setup(args)
    if rank == 0:  # experts that compute in another dtype than their peers' (as autocast may make them)
        compute = dispatcher.compute
        dispatcher.compute = lambda *a: compute(*a).double()
    dtype = torch.float32 if autocast else torch.bfloat16
    for m in (ref, moe):
        bias_gate(m)
        precision.cast_parameters(m.train(), dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x_ref = x_all.to(dtype).clone().requires_grad_()
        (ref(x_ref).float() * g_all).sum().backward()
        x = x_all[mine].to(dtype).clone().requires_grad_()
        y = moe(x)
        (y.float() * g_all[mine]).sum().backward()
    close(x.grad, x_ref.grad[mine])


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_ep_dispatcher_bf16_with_an_idle_rank(autocast):
    run_distributed(_ep_bf16_worker, 4, args=(autocast,))
