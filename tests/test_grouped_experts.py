"""Stacked routed experts (``models/deepseek_v3/experts.py``) against per-expert references: the grouped GEMMs
with empty groups and their fallback loop, the SwiGLU forward and backward in every precision (fp32, BF16
parameters, autocast, BF16 emulation, FP8), the FP8 weight cache, deferred weight gradients (I + W = B), and
routing plus dispatch without a host synchronisation (CPU and CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import haillm.fp8.linear as fp8_linear_module
import haillm.models.deepseek_v3.experts as experts_module
from haillm.fp8 import fp8_linear, weight_quant
from haillm.models.deepseek_v3 import get_preset
from haillm.models.deepseek_v3.experts import GroupedExperts, group_mm, group_wgrad
from haillm.models.deepseek_v3.model import init_weights
from haillm.models.deepseek_v3.moe import MoE
from haillm.ops import deferring_weight_grads, precision
from haillm.ops.linear import Bf16EmulatedLinear

COUNTS = [0, 5, 0, 9, 3, 0]  # idle experts first, in the middle and last


def experts(dim: int = 64, inter: int = 32, n: int = len(COUNTS), seed: int = 0) -> GroupedExperts:
    module = GroupedExperts(dim, inter, range(10, 10 + n))  # global ids 10.. (an expert-parallel block)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1, generator=gen)
    return module


def rows(counts: list[int], dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), dim, generator=gen), torch.tensor(counts)


def bounds(counts: list[int]) -> list[tuple[int, int, int]]:
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [(g, e - c, e) for g, (c, e) in enumerate(zip(counts, ends, strict=True))]


# ---- grouped GEMMs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,out,grouped", [(64, 32, True), (12, 6, False)], ids=["grouped", "fallback"])
def test_group_gemms_match_per_group_products(monkeypatch, dim, out, grouped):
    """Aligned widths run torch._grouped_mm without reading offsets on the host; odd widths (rows not 16-byte
    multiples) take the per-group loop. Both equal the per-group products, empty groups included."""
    if grouped:
        monkeypatch.setattr(experts_module, "_bounds", lambda offs: pytest.fail("host offsets on the grouped path"))
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(sum(COUNTS), dim, generator=gen), torch.randn(sum(COUNTS), out, generator=gen)
    w = torch.randn(len(COUNTS), dim, out, generator=gen)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    y, dw = group_mm(x, w, offs), group_wgrad(dy, x, offs)
    for g, s, e in bounds(COUNTS):
        torch.testing.assert_close(y[s:e], x[s:e] @ w[g], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dw[g], dy[s:e].T @ x[s:e], rtol=1e-6, atol=1e-6)  # zeros when e == s
    empty = torch.zeros(len(COUNTS), dtype=torch.int32)
    assert group_mm(x[:0], w, empty).shape == (0, out)
    assert torch.equal(group_wgrad(dy[:0], x[:0], empty), torch.zeros(len(COUNTS), out, dim))


# ---- the SwiGLU experts against per-expert references -----------------------------------------------------


def grouped_run(module: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, g: torch.Tensor) -> list:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x, counts)
    (y.float() * g).sum().backward()
    return [y, x.grad, module.w1.grad, module.w2.grad, module.w3.grad]


def loop_run(module: GroupedExperts, x: torch.Tensor, counts: list[int], g: torch.Tensor, linear) -> list:
    """The per-expert loop the stacks replace: each busy expert's SwiGLU through ``linear(x, w)``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    w1, w2, w3 = module.w1, module.w2, module.w3
    y = torch.cat([linear(F.silu(linear(x[s:e], w1[i])) * linear(x[s:e], w3[i]), w2[i])
                   for i, s, e in bounds(counts) if e > s])
    (y.float() * g).sum().backward()
    return [y, x.grad, w1.grad, w2.grad, w3.grad]


def assert_same(got: list, want: list) -> None:
    for name, a, b in zip(["y", "dx", "dw1", "dw2", "dw3"], got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_fp32_is_bitwise_the_per_expert_loop_and_idle_experts_get_zero_gradients():
    module = experts()
    x, counts = rows(COUNTS, 64)
    g = torch.randn(sum(COUNTS), 64)
    got = grouped_run(module, x, counts, g)
    assert_same(got, loop_run(module, x, COUNTS, g, F.linear))
    for w in got[2:]:
        assert not w[[0, 2, 5]].any() and w[[1, 3, 4]].abs().amin(dim=(1, 2)).gt(0).all()


def test_bf16_parameters_on_cpu_are_bitwise_the_emulated_bf16_loop():
    """BF16 parameters and activations: every GEMM is fp32 arithmetic on bf16 operands, rounded to bf16
    (``ops.precision``), exactly as a per-expert loop of ``precision.linear``."""
    module = experts().to(torch.bfloat16)
    x, counts = rows(COUNTS, 64)
    g = torch.randn(sum(COUNTS), 64)
    got = grouped_run(module, x.bfloat16(), counts, g)
    assert got[0].dtype == got[2].dtype == torch.bfloat16
    assert_same(got, loop_run(module, x.bfloat16(), COUNTS, g, precision.linear))


def test_autocast_computes_in_bf16_with_fp32_parameters():
    """Under CPU autocast: bf16 operands (each GEMM casts its own), bf16 output, fp32 gradients, as autocast
    does for ``F.linear``."""
    module = experts()
    x, counts = rows(COUNTS, 64)
    g = torch.randn(sum(COUNTS), 64)

    def autocast_linear(a, w):
        return precision.linear(a.bfloat16(), w.bfloat16())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_run(module, x, counts, g)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == got[2].dtype == torch.float32
    assert_same(got, loop_run(module, x, COUNTS, g, autocast_linear))


def test_bf16_emulated_is_bitwise_the_emulated_linear_loop():
    module = experts()
    module.set_precision("bf16_emulated")
    x, counts = rows(COUNTS, 64)
    g = torch.randn(sum(COUNTS), 64)
    assert_same(grouped_run(module, x, counts, g), loop_run(module, x, COUNTS, g, Bf16EmulatedLinear.apply))


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_is_bitwise_the_fp8_linear_of_each_expert(pow2):
    """DeepSeek-V3's FP8 recipe per expert (its FP8 Wgrad included), from one quantization of each stack."""
    module = experts(dim=256, inter=128)
    module.set_precision("fp8", pow2_scales=pow2, wgrad="fp8")
    counts = [0, 40, 0, 130, 7, 0]  # one expert spans two 128-token Wgrad tiles
    x, tensor_counts = rows(counts, 256)
    g = torch.randn(sum(counts), 256)

    def expert_fp8(a, w):
        return fp8_linear(a, w, weight_q=weight_quant(w.detach(), pow2=pow2), pow2=pow2, wgrad="fp8")

    assert_same(grouped_run(module, x, tensor_counts, g), loop_run(module, x, counts, g, expert_fp8))


def test_fp8_stacks_are_quantized_once_per_weight_change(monkeypatch):
    """With ``cache_transposed`` the transposed stacks are cached with the stacks (one quantization pass each);
    without it (the default) backward transposes the cached stack, bitwise the same gradients."""
    grads = {}
    for cache_transposed in (False, True):
        module = experts(dim=128, inter=128)
        module.set_precision("fp8", cache_transposed=cache_transposed)
        x, counts = rows([3, 0, 4, 1, 0, 2], 128)
        x.requires_grad_()
        module(x, counts).square().sum().backward()
        grads[cache_transposed] = [x.grad, *(p.grad for p in module.parameters())]
        assert len(module._fp8["w1"].get()) == (4 if cache_transposed else 2)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
    calls = []
    real = fp8_linear_module.weight_quant_with_t
    monkeypatch.setattr(fp8_linear_module, "weight_quant_with_t",
                        lambda w, *a, **k: calls.append(w.shape) or real(w, *a, **k))
    module = experts(dim=128, inter=128)
    module.set_precision("fp8", cache_transposed=True)
    x, counts = rows([3, 0, 4, 1, 0, 2], 128)
    for _ in range(2):  # micro-batches of one step share the quantized stacks
        module(x, counts).sum().backward()
    assert calls == [(6, 128, 128)] * 3  # one [E, out, in] quantization (per expert, with W.T) per stack
    with torch.no_grad():
        module.w1.add_(1.0)  # an optimizer step: the version counter moves
    module(x, counts)
    assert len(calls) == 4
    module.invalidate_fp8_weight()  # ZeRO-1's in-place gather does not move it: the trainer invalidates
    module(x, counts)
    assert len(calls) == 7
    module.w2.data = module.w2.detach().clone()  # ZeRO-1 moves parameters into its buckets
    module(x, counts)
    assert len(calls) == 8


@pytest.mark.parametrize("prec", ["default", "bf16_emulated", "fp8"])
def test_input_grad_then_weight_grad_equals_full_backward(prec):
    """I + W = B: inside ``deferring_weight_grads`` backward leaves one closure per stack and no weight
    gradient; running the closures gives exactly the full backward's gradients (accumulated)."""
    module = experts(dim=128, inter=128)
    module.set_precision(prec)
    queue = assert_deferred_is_full_backward(module, [3, 0, 4, 1, 0, 2], 128)
    assert len(queue) == 3
    assert all(not p.grad.requires_grad for p in module.parameters())


def assert_deferred_is_full_backward(module: GroupedExperts, counts: list[int], dim: int) -> list:
    """Backward inside ``deferring_weight_grads`` gives the full backward's input gradient and no weight
    gradient; running the queued closures then gives its weight gradients. Returns the queue."""
    x, tensor_counts = rows(counts, dim)
    full = grouped_run(module, x, tensor_counts, torch.ones(sum(counts), dim))
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with deferring_weight_grads() as queue:
        module(xi, tensor_counts).sum().backward()
    assert torch.equal(xi.grad, full[1]) and all(p.grad is None for p in module.parameters())
    for fn in queue:
        fn()
    for p, want in zip((module.w1, module.w2, module.w3), full[2:], strict=True):
        assert torch.equal(p.grad, want)
    return queue


# ---- no host synchronisation in routing and dispatch ------------------------------------------------------

# aten ops whose output size depends on data, or that read a value back: each waits for a GPU.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique", "_unique2",
               "unique_consecutive", "unique_dim", "equal", "is_nonzero", "allclose", "item"}


class ForbidHostSync(TorchDispatchMode):
    """Fails on any op that would make the host wait for the device: reading values back (``item``,
    ``bool``, ...), data-sized outputs (``nonzero``, ``bincount``, boolean-mask indexing,
    ``repeat_interleave`` without ``output_size``), and ``Tensor.tolist`` (which bypasses dispatch)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        sized_by_data = name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3
        if name in SYNCING_OPS or bool_index or sized_by_data:
            raise AssertionError(f"host synchronisation: aten.{name}")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda t: pytest.fail("host synchronisation: Tensor.tolist")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_the_sync_detector_catches_what_it_must():
    t = torch.tensor([1, 0, 2])
    for sync in (lambda: t.tolist(), lambda: t.sum().item(), lambda: bool(t[0]), lambda: torch.bincount(t),
                 lambda: t[t > 0], lambda: t.nonzero(), lambda: torch.arange(3).repeat_interleave(t)):
        with pytest.raises((AssertionError, pytest.fail.Exception)), ForbidHostSync():
            sync()
    with ForbidHostSync():
        torch.arange(3).repeat_interleave(t, output_size=3)


def moe_layer(device: str = "cpu", dtype: torch.dtype = torch.float32) -> MoE:
    args = get_preset("tiny").replace(balance_alpha=1e-3)
    moe = MoE(args)
    init_weights(moe, 0, 0.1, prefix="layers.1.ffn")
    moe.gate.bias[2] = -10.0  # an idle expert: an empty group
    return moe.to(device=device, dtype=dtype).train()


def test_routing_and_dispatch_never_wait_for_the_device():
    """The single-device MoE layer's training forward (routing, load counts, balance loss, dispatch,
    grouped experts, combine) and backward without one host synchronisation."""
    moe = moe_layer()
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with ForbidHostSync():
        (moe(x).square().sum() + moe.balance_loss).backward()
    assert x.grad is not None and moe.experts.w1.grad[2].abs().sum() == 0
    assert moe.tokens_per_expert[2] == 0 and moe.tokens_per_expert.sum() == 32 * moe.gate.topk


# ---- CUDA ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_grouped_experts_match_the_loop_and_keep_idle_experts_zero():
    """``torch._grouped_mm`` in BF16 on the GPU (empty groups included) against the per-expert loop."""
    module = experts(dim=256, inter=128).to("cuda", torch.bfloat16)
    x, counts = rows(COUNTS, 256)
    x, counts, g = x.cuda().bfloat16(), counts.cuda(), torch.randn(sum(COUNTS), 256, device="cuda")
    assert experts_module._grouped_serves(x, module.w1.transpose(1, 2))
    got = grouped_run(module, x, counts, g)
    want = loop_run(module, x, COUNTS, g, F.linear)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    for w in got[2:]:
        assert not w[[0, 2, 5]].any()


@pytest.mark.gpu
def test_cuda_fp32_falls_back_to_the_loop():
    module = experts().cuda()
    x, counts = rows(COUNTS, 64)
    g = torch.randn(sum(COUNTS), 64, device="cuda")
    got = grouped_run(module, x.cuda(), counts.cuda(), g)
    want = loop_run(module, x.cuda(), COUNTS, g, F.linear)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_moe_forward_backward_without_sync():
    moe = moe_layer("cuda", torch.bfloat16)
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (moe(x).float().square().sum() + moe.balance_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(moe.experts.w1.grad).all() and moe.experts.w1.grad[2].abs().sum() == 0


@pytest.mark.gpu
def test_cuda_misaligned_stack_falls_back_to_the_loop():
    """A stack that starts 2 bytes into its storage (as a view into a ZeRO bucket could) is not given to
    ``torch._grouped_mm``, which needs 16-byte aligned base pointers; the loop computes the same products."""
    x = torch.randn(sum(COUNTS), 256, device="cuda", dtype=torch.bfloat16)
    storage = torch.randn(1 + len(COUNTS) * 256 * 128, device="cuda", dtype=torch.bfloat16)
    b = storage[1:].view(len(COUNTS), 256, 128)
    assert not experts_module._grouped_serves(x, b)
    assert experts_module._grouped_serves(x, b.clone())
