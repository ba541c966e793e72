"""Grouped FP8 GEMM (``haillm.fp8.grouped``) and FP8 ``GroupedExperts`` on CPU.

The grouped GEMM's reference against a per-expert ``fp8_gemm_reference`` loop and against the float64 product
of the dequantized operands (empty groups, one group, widths that are not whole blocks, the transposed view
Dgrad reads); the grouped FP8 Wgrad (``fp8_group_wgrad``): its 128-aligned token layout against each group's
own 1x128 token tiles, bit for bit and without reading the device, and its result against the per-expert
``fp8_wgrad``; the per-expert quantization of a weight stack against ``weight_quant`` of each weight; the FP8
experts in both Wgrad modes against a per-expert composition of the same FP8 ops, deferral included. The
CUDA kernels are checked against the same references in ``test_fp8_grouped_gpu.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from test_grouped_experts import ForbidHostSync, assert_deferred_is_full_backward, bounds, experts, grouped_run, rows

import haillm.models.deepseek_v3.experts as experts_module
from haillm.fp8 import (
    FP8_DTYPE,
    GRAD_AMAX_MIN,
    act_dequant,
    act_quant,
    act_quant_t,
    fp8_gemm,
    fp8_group_wgrad,
    fp8_linear,
    fp8_wgrad,
    requant_t,
    weight_dequant,
    weight_quant,
)
from haillm.fp8.fused import fusion
from haillm.fp8.grouped import aligned_token_layout, fp8_group_gemm, group_gemm_plan, wgrad_operands
from haillm.fp8.quant import weight_quant_with_t

SM90, SM80 = (9, 0), (8, 0)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def stack_operands(counts: list[int], n: int, k: int, seed: int = 0):
    """FP8 ``a`` (all groups' rows, one ``act_quant``), a quantized weight stack ``[G, n, k]`` and ``offs``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g)
    w = torch.randn(len(counts), n, k, generator=g) * torch.logspace(-2, 1, len(counts))[:, None, None]
    return (*act_quant(x), *weight_quant(w), torch.tensor(counts).cumsum(0).to(torch.int32))


# ---- fp8_group_gemm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "n", "k"),
    [([0, 5, 0, 130, 3, 0], 256, 384), ([37], 200, 300), ([0, 129, 1, 0, 7], 130, 129), ([0, 0, 0], 128, 128)],
    ids=["empty-groups", "one-group", "partial-blocks", "no-rows"],
)
def test_group_gemm_is_the_per_expert_gemm(counts, n, k):
    """Fprop ``a @ b[g].T`` and Dgrad through the transposed view of the stack (``b[g].T``'s blocks, read in
    place) equal ``fp8_gemm`` of each expert bitwise, and the float64 product of the dequantized operands to
    fp32 rounding: the grouping, the per-group scales and the transposed scales are right."""
    a, a_s, b, b_s, offs = stack_operands(counts, n, k)
    dy_q, dy_s = act_quant(torch.randn(sum(counts), n, generator=torch.Generator().manual_seed(1)))
    b_t, b_t_s = b.transpose(1, 2), b_s.transpose(1, 2)  # Dgrad: dx = dy @ W, W.T as [G, k, n]
    y = fp8_group_gemm(a, a_s, b, b_s, offs, torch.float32)
    dx = fp8_group_gemm(dy_q, dy_s, b_t, b_t_s, offs, torch.float32)
    assert y.shape == (sum(counts), n) and dx.shape == (sum(counts), k) and y.dtype == torch.float32
    for g, s, e in bounds(counts):
        assert torch.equal(y[s:e], fp8_gemm(a[s:e], a_s[s:e], b[g], b_s[g], torch.float32))
        assert torch.equal(dx[s:e], fp8_gemm(dy_q[s:e], dy_s[s:e], b[g].t().contiguous(), b_s[g].t().contiguous(),
                                             torch.float32))
        w64 = weight_dequant(b[g], b_s[g]).double()
        a64, dy64 = act_dequant(a[s:e], a_s[s:e]).double(), act_dequant(dy_q[s:e], dy_s[s:e]).double()
        torch.testing.assert_close(y[s:e].double(), a64 @ w64.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx[s:e].double(), dy64 @ w64, rtol=1e-5, atol=1e-5)
    assert fp8_group_gemm(a, a_s, b, b_s, offs).dtype == torch.bfloat16


def test_group_gemm_checks_its_arguments_and_plan():
    a, a_s, b, b_s, offs = stack_operands([3, 4], 128, 256)
    with pytest.raises(ValueError, match="int32"):
        fp8_group_gemm(a, a_s, b, b_s, offs.long())
    with pytest.raises(ValueError, match="scale shapes"):
        fp8_group_gemm(a, a_s, b, b_s[:, :, :1], offs)
    with pytest.raises(TypeError, match="float8"):
        fp8_group_gemm(a.float(), a_s, b, b_s, offs)
    assert [group_gemm_plan(c) for c in (None, SM90, SM80)] == ["reference", "triton", "unsupported"]


# ---- fp8_group_wgrad -----------------------------------------------------------------------------------------

# Row counts: empty groups, exactly one tile, one row past it, a single row; one group; tiles less one row.
WGRAD_CASES = [([0, 128, 0, 129, 1, 0], 200, 72), ([300], 128, 256), ([1, 0, 127, 255], 130, 129)]
WGRAD_IDS = ["empty-128-129-1", "one-group", "partial-blocks"]


def wgrad_inputs(counts: list[int], n: int, k: int, seed: int = 0):
    """``dy [M, n]`` whose groups differ in magnitude by 10^4 (a tile shared across groups would change their
    scales), ``act_quant(x)`` of ``x [M, k]`` and ``offs``."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.logspace(-3, 1, len(counts)).repeat_interleave(torch.tensor(counts))
    dy = torch.randn(sum(counts), n, generator=g) * magnitude[:, None]
    x = torch.randn(sum(counts), k, generator=g) * magnitude.flip(0)[:, None]
    return dy, *act_quant(x), torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(("counts", "n", "k"), WGRAD_CASES, ids=WGRAD_IDS)
def test_aligned_token_layout_gives_each_group_its_own_tiles(counts, n, k, pow2):
    """Each group starts at a multiple of 128 in the padded token layout, so the 128x1 quantization of all rows
    at once is, bit for bit, ``act_quant_t`` of the group's ``dy`` and ``requant_t`` of its FP8 ``x`` at the
    group's padded columns; the padding is FP8 zero and the groups do not overlap."""
    dy, x_q, x_s, offs = wgrad_inputs(counts, n, k)
    a, a_s, b, b_s, layout = wgrad_operands(dy, x_q, x_s, offs, pow2)
    assert a.shape == (n, layout.size) and b.shape == (k, layout.size) and layout.size % 128 == 0
    assert a_s.shape == (n, layout.size // 128) and b_s.shape == (k, layout.size // 128)
    starts, ends = layout.starts.tolist(), layout.ends.tolist()
    assert ends[-1] <= layout.size and all(e <= s for e, s in zip(ends, starts[1:], strict=False))
    for g, s, e in bounds(counts):
        ps, pe, c = starts[g], ends[g], e - s
        assert ps % 128 == 0 and pe - ps == -(-c // 128) * 128
        assert torch.equal(layout.rows[s:e], torch.arange(ps, ps + c))
        want_a, want_a_s = act_quant_t(dy[s:e], pow2=pow2, min_amax=GRAD_AMAX_MIN)
        want_b, want_b_s = requant_t(x_q[s:e], x_s[s:e], pow2=pow2)
        assert same_bits(a[:, ps:ps + c], want_a) and torch.equal(a_s[:, ps // 128:pe // 128], want_a_s)
        assert same_bits(b[:, ps:ps + c], want_b) and torch.equal(b_s[:, ps // 128:pe // 128], want_b_s)
        assert not a[:, ps + c:pe].view(torch.uint8).any() and not b[:, ps + c:pe].view(torch.uint8).any()


def test_aligned_token_layout_reads_nothing_on_the_host():
    """The layout and the padded operands come from device-side ops only (no value read back, no output sized by
    data), so the same code runs on a GPU without a host synchronisation."""
    dy, x_q, x_s, offs = wgrad_inputs([0, 128, 0, 129, 1, 0], 200, 72)
    with ForbidHostSync():
        layout = aligned_token_layout(offs, dy.shape[0])
        wgrad_operands(dy, x_q, x_s, offs, pow2=True)
    assert layout.size == 896  # ⌊(258 + 127 * 6) / 128⌋ * 128: a bound from the shapes, not the counts


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(("counts", "n", "k"), WGRAD_CASES, ids=WGRAD_IDS)
def test_group_wgrad_is_the_per_expert_fp8_wgrad(counts, n, k, pow2):
    """``fp8_group_wgrad`` equals ``fp8_wgrad`` of each group's rows bit for bit (same FP8 operands, same
    reference GEMM over the same 128-token slices) and is zero for empty groups."""
    dy, x_q, x_s, offs = wgrad_inputs(counts, n, k)
    dw = fp8_group_wgrad(dy, x_q, x_s, offs, pow2)
    assert dw.shape == (len(counts), n, k) and dw.dtype == torch.float32
    dw16 = fp8_group_wgrad(dy, x_q, x_s, offs, pow2, out_dtype=torch.bfloat16)
    for g, s, e in bounds(counts):
        if e == s:
            assert not dw[g].any() and not dw16[g].any()
            continue
        assert torch.equal(dw[g], fp8_wgrad(dy[s:e], x_q[s:e], x_s[s:e], pow2))
        assert torch.equal(dw16[g], fp8_wgrad(dy[s:e], x_q[s:e], x_s[s:e], pow2, torch.bfloat16))


def test_group_wgrad_of_no_rows_is_zero():
    dy, x_q, x_s, offs = wgrad_inputs([0, 0, 0], 200, 72)
    assert aligned_token_layout(offs, 0).size == 0
    assert torch.equal(fp8_group_wgrad(dy, x_q, x_s, offs), torch.zeros(3, 200, 72))
    with pytest.raises(ValueError, match="int32"):
        fp8_group_wgrad(dy, x_q, x_s, offs.long())


# ---- per-expert quantization of a stack --------------------------------------------------------------------


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(("n", "k"), [(128, 256), (200, 300), (72, 64)])
def test_stack_quantization_is_per_expert(n, k, pow2):
    """``weight_quant`` of ``[E, n, k]`` in one call equals ``weight_quant`` of each expert: with ``n`` not a
    multiple of 128 the blocks of ``[E * n, k]`` would straddle two experts, and do give other scales."""
    magnitudes = torch.tensor([1e-3, 1.0, 30.0])[:, None, None]
    w = torch.randn(3, n, k, generator=torch.Generator().manual_seed(n)) * magnitudes
    q, s = weight_quant(w, pow2=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and q.is_contiguous()
    assert s.shape == (3, -(-n // 128), -(-k // 128))
    for e in range(3):
        want_q, want_s = weight_quant(w[e], pow2=pow2)
        assert same_bits(q[e], want_q) and torch.equal(s[e], want_s)
        assert torch.equal(weight_dequant(q, s)[e], weight_dequant(want_q, want_s))
    flat_s = weight_quant(w.reshape(3 * n, k), pow2=pow2)[1]
    assert (flat_s.shape == s.flatten(0, 1).shape) == (n % 128 == 0)
    with pytest.raises(ValueError, match="3-D stack"):
        weight_quant(w[None])
    # With the transposed stack Dgrad reads: each expert's (q.T, s.T), the same bits
    q_w, s_w, q_t, s_t = weight_quant_with_t(w, pow2=pow2)
    assert same_bits(q_w, q) and torch.equal(s_w, s)
    assert same_bits(q_t, q.transpose(1, 2).contiguous()) and torch.equal(s_t, s.transpose(1, 2))


# ---- FP8 GroupedExperts --------------------------------------------------------------------------------------


def per_expert_linears(module, x: torch.Tensor, counts: list[int], g: torch.Tensor, linear) -> list:
    """The experts' SwiGLU with each GEMM one expert at a time (``linear(x, w)``) and the elementwise SiLU and
    product over all rows at once, as the module does: CPU elementwise kernels may round an element
    differently with its position (seen at width 72), which FP8 Wgrad scales would pass on."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    busy = [(i, s, e) for i, s, e in bounds(counts) if e > s]

    def grouped(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(a[s:e], w[i]) for i, s, e in busy])

    y = grouped(F.silu(grouped(x, module.w1)) * grouped(x, module.w3), module.w2)
    (y.float() * g).sum().backward()
    return [y, x.grad, module.w1.grad, module.w2.grad, module.w3.grad]


def expert_fp8(wgrad: str):
    """One expert's FP8 linear (``fp8_linear``, the plain Linear's op) in Wgrad mode ``wgrad``."""
    return lambda a, w: fp8_linear(a, w, weight_q=weight_quant(w.detach()), wgrad=wgrad)


WIDTHS = [(256, 128), (200, 72), (130, 70)]  # whole blocks; partial blocks; odd (bf16 Wgrad's per-expert loop)


@pytest.mark.parametrize("wgrad", ["bf16", "fp8"])
@pytest.mark.parametrize(("dim", "inter"), WIDTHS, ids=["blocks", "partial", "odd"])
def test_fp8_experts_are_the_per_expert_fp8_composition(monkeypatch, dim, inter, wgrad):
    """Forward, input and weight gradients of the FP8 experts equal, bit for bit, the SwiGLU with each GEMM
    through the FP8 ops one expert at a time, at any width. The experts read no host offsets (the CPU GEMM
    references do, by design): "fp8" Wgrad at any width, "bf16" where ``torch._grouped_mm`` takes the widths."""
    module = experts(dim=dim, inter=inter)
    module.set_precision("fp8", wgrad=wgrad)
    counts = [0, 40, 0, 130, 7, 0]
    x, tensor_counts = rows(counts, dim)
    g = torch.randn(sum(counts), dim, generator=torch.Generator().manual_seed(2))
    if wgrad == "fp8" or inter % 4 == 0:
        monkeypatch.setattr(experts_module, "_bounds", lambda offs: pytest.fail("host offsets in the experts"))
    got = grouped_run(module, x, tensor_counts, g)
    monkeypatch.undo()
    want = per_expert_linears(module, x, counts, g, expert_fp8(wgrad))
    for name, a, b in zip(["y", "dx", "dw1", "dw2", "dw3"], got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for w in got[2:]:
        assert not w[[0, 2, 5]].any()
    assert "wgrad=" + wgrad in repr(module)


def test_bf16_wgrad_is_the_bf16_product_of_dy_and_the_dequantized_x():
    """The "bf16" mode's weight gradient, independently of ``ops.precision``: bf16(dy).T @ bf16(q_x * s_x) in
    float64, to bf16's rounding of the result; DeepSeek's FP8 Wgrad differs from it by more."""
    dim, inter, counts = 256, 128, [0, 70, 200]
    module = experts(dim=dim, inter=inter, n=3)
    x, _ = rows(counts, dim)
    dy = torch.randn(sum(counts), inter, generator=torch.Generator().manual_seed(3))
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    grads = {}
    for mode in ("bf16", "fp8"):
        module.set_precision("fp8", wgrad=mode)
        module.zero_grad(set_to_none=True)
        (module._linear(x, "w1", offs) * dy).sum().backward()
        grads[mode] = module.w1.grad
    x64 = act_dequant(*act_quant(x), dtype=torch.bfloat16).double()
    dy64 = dy.bfloat16().double()
    for g, s, e in bounds(counts):
        want = dy64[s:e].T @ x64[s:e]
        torch.testing.assert_close(grads["bf16"][g].double(), want, rtol=2**-8, atol=1e-6 * want.abs().max())
    err = {m: (grads[m].double() - torch.stack([dy64[s:e].T @ x64[s:e] for _, s, e in bounds(counts)])).abs().max()
           for m in grads}
    assert err["fp8"] > 2 * err["bf16"]


@pytest.mark.parametrize("wgrad", ["bf16", "fp8"])
def test_fp8_weight_grads_can_be_deferred(wgrad):
    """I + W = B in both Wgrad modes, at widths that are not whole blocks."""
    module = experts(dim=200, inter=72)
    module.set_precision("fp8", pow2_scales=True, wgrad=wgrad)
    assert_deferred_is_full_backward(module, [3, 0, 140, 1, 0, 2], 200)


def test_set_precision_validates_the_wgrad_mode():
    module = experts()
    with pytest.raises(ValueError, match="'fp16'"):
        module.set_precision("fp8", wgrad="fp16")
    module.set_precision("fp8")  # any width runs FP8 now
    assert module.precision == "fp8" and module.fp8_wgrad == "bf16"
    x, counts = rows([1, 2, 0, 3, 0, 1], 64)
    assert module(x, counts).shape == (7, 64)


def test_fp8_experts_quantize_each_input_once(monkeypatch):
    """FP8 experts: w1 and w3 share one quantization of the routed rows and the SwiGLU writes w2's FP8 input
    (``fp8.fused``), bitwise what each grouped linear quantizing its own input computes."""
    module = experts(dim=200, inter=72)
    module.set_precision("fp8")
    counts = [0, 40, 0, 130, 7, 0]
    x, tensor_counts = rows(counts, 200)
    g = torch.randn(sum(counts), 200, generator=torch.Generator().manual_seed(3))
    calls = []
    quantize = experts_module.act_quant
    monkeypatch.setattr(experts_module, "act_quant", lambda *a, **k: calls.append(a[0].shape) or quantize(*a, **k))
    fused = grouped_run(module, x, tensor_counts, g)
    fused_calls, calls[:] = list(calls), []
    with fusion(False):
        unfused = grouped_run(module, x, tensor_counts, g)
    assert fused_calls[0] == (177, 200) and len(fused_calls) == len(calls) - 2  # x once, not per linear
    for name, a, b in zip(["y", "dx", "dw1", "dw2", "dw3"], fused, unfused, strict=True):
        assert torch.equal(a, b), name
