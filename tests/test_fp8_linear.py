"""FP8 linear: accuracy of forward and both grads against float64 F.linear, the exact recipe of each GEMM,
FP8-only saved activations, and the once-per-step weight cache.

Thresholds: each FP8 GEMM rounds its two operands once (~3.4e-4 of calc_diff each, measured ~7e-4 per
GEMM, like DeepGEMM's < 1e-3). The FP8 Wgrad without power-of-two scales rounds ``x`` twice (1x128 in
forward, then re-tiled 128x1 from the FP8 copy), three roundings in all, measured ~1.0e-3: its bound is
1.5e-3. With pow2 scales the re-tiling is exact in E4M3's normal range and Wgrad is back under 1e-3. The
BF16 Wgrad rounds ``x`` to E4M3 once and ``dy`` to bf16: inside the same bounds.
"""

import pytest
import torch
import torch.nn.functional as F

import haillm.fp8.linear as fp8_linear_module
from haillm.fp8 import (
    FP8_DTYPE,
    GRAD_AMAX_MIN,
    Fp8WeightCache,
    act_dequant,
    act_quant,
    act_quant_t,
    calc_diff,
    fp8_dgrad,
    fp8_linear,
    fp8_wgrad,
    requant_t,
    weight_dequant,
    weight_quant,
)
from haillm.fp8.linear import bf16_wgrad


def make(t1=2, t2=150, k=256, n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t1, t2, k, generator=g).requires_grad_()  # 300 tokens: a partial token tile
    w = (torch.randn(n, k, generator=g) / k**0.5).requires_grad_()
    dy = torch.randn(t1, t2, n, generator=g)
    return x, w, dy


def fp8_run(x, w, dy, **kw):
    x.grad = w.grad = None
    y = fp8_linear(x, w, **kw)
    y.backward(dy)
    return y.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
@pytest.mark.parametrize("pow2,wgrad_bound", [(False, 1.5e-3), (True, 1e-3)])
def test_matches_high_precision_linear(pow2, wgrad_bound, wgrad):
    x, w, dy = make()
    y, dx, dw = fp8_run(x, w, dy, pow2=pow2, wgrad=wgrad)
    assert y.dtype == dx.dtype == dw.dtype == torch.float32 and y.shape == (2, 150, 384)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.linear(x64, w64).backward(dy.double())
    assert calc_diff(y, F.linear(x64, w64)) < 1e-3
    assert calc_diff(dx, x64.grad) < 1e-3
    assert calc_diff(dw, w64.grad) < wgrad_bound


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
def test_each_gemm_follows_the_recipe(wgrad):
    """Each result equals the float64 product of the dequantized operands of its recipe (the GEMM's
    per-block promotion changes only fp32 rounding), so a wrong tiling or transpose shows up here. The BF16
    Wgrad is defined exactly: bf16 ``dy`` times the bf16 dequantization of the saved FP8 ``x``, fp32
    arithmetic, the result rounded to bf16 (what a BF16 GEMM returns)."""
    x, w, dy = make(seed=1)
    y, dx, dw = fp8_run(x, w, dy, wgrad=wgrad)
    x2, dy2 = x.detach().reshape(300, 256), dy.reshape(300, 384)
    xq = act_quant(x2)
    w_hat = weight_dequant(*weight_quant(w.detach())).double()
    y_ref = act_dequant(*xq).double() @ w_hat.T
    dx_ref = act_dequant(*act_quant(dy2, min_amax=GRAD_AMAX_MIN)).double() @ w_hat
    for got, ref in ((y.reshape(300, 384), y_ref), (dx.reshape(300, 256), dx_ref)):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if wgrad == "fp8":
        dyt = act_dequant(*act_quant_t(dy2, min_amax=GRAD_AMAX_MIN)).double()
        dw_ref = dyt @ act_dequant(*requant_t(*xq)).double().T
        assert (dw.double() - dw_ref).abs().max() <= 1e-5 * dw_ref.abs().max()
    else:
        x_bf16 = act_dequant(*xq, dtype=torch.bfloat16)
        assert torch.equal(dw, (dy2.bfloat16().float().T @ x_bf16.float()).bfloat16().float())


def test_wgrad_mode_is_checked():
    x, w, _ = make()
    with pytest.raises(ValueError, match="'fp16'"):
        fp8_linear(x, w, wgrad="fp16")


@pytest.mark.parametrize("pow2", [False, True])
def test_gradients_are_scale_invariant(pow2):
    """Scaling the output gradient by a power of two scales both input and weight gradient by exactly that
    factor, however small: without loss scaling the gradient's magnitude depends on the token count and
    the layout's averaging, and it must not change which values E4M3 can represent."""
    x, w, dy = make(seed=2)
    _, dx, dw = fp8_run(x, w, dy, pow2=pow2)
    factor = 2.0**-40  # puts every gradient tile far below the 1e-4 activation floor
    _, dx_small, dw_small = fp8_run(x, w, dy * factor, pow2=pow2)
    assert torch.equal(dx_small, dx * factor) and torch.equal(dw_small, dw * factor)


def test_saves_only_fp8_activations():
    x, w, _ = make()
    y = fp8_linear(x, w, pow2=True)
    saved = y.grad_fn.saved_tensors
    x_q, x_s, w_q, w_s = saved
    assert x_q.dtype == FP8_DTYPE and x_q.shape == (300, 256)
    assert w_q.dtype == FP8_DTYPE and w_q.shape == (384, 256)
    assert x_s.shape == (300, 2) and w_s.shape == (3, 2)
    assert all(t.dtype in (FP8_DTYPE, torch.float32) for t in saved)
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) == 300 * 2 + 3 * 2  # scales only
    assert (torch.frexp(x_s)[0] == 0.5).all()  # pow2 reaches the activation scales


def test_input_without_grad_gives_weight_grad_only():
    x, w, dy = make()
    x = x.detach()
    fp8_linear(x, w).backward(dy)
    assert x.grad is None and w.grad is not None and w.grad.shape == w.shape


def test_weight_cache_reused_until_weight_changes():
    x, w, dy = make(seed=2)
    cache = Fp8WeightCache(w)
    first = cache.get()
    assert cache.get() is first  # second micro-batch: no requantization

    # Two micro-batches through the cache accumulate the same grads as two uncached calls.
    for _ in range(2):
        fp8_linear(x, w, weight_q=cache.get()).backward(dy)
    cached_grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    for _ in range(2):
        fp8_linear(x, w).backward(dy)
    assert torch.equal(cached_grads[0], x.grad) and torch.equal(cached_grads[1], w.grad)

    torch.optim.SGD([w], lr=0.1).step()  # in-place update bumps weight._version
    second = cache.get()
    assert second is not first
    want_q, want_s = weight_quant(w.detach())
    assert torch.equal(second[0].view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(second[1], want_s)

    w.data.mul_(2)  # invisible to _version: the documented case for invalidate()
    cache.invalidate()
    assert torch.equal(cache.get()[1], 2 * want_s)


def test_transposed_weight_copy_is_the_same_dgrad():
    """The cache's transposed copy (made once per step for Dgrad) is ``weight_quant``'s pair transposed, and
    backward through it is bitwise backward through a per-call transpose."""
    x, w, dy = make(t2=75, k=200, n=320, seed=3)  # partial blocks in both weight dims
    q, s, qt, st = Fp8WeightCache(w, transposed=True).get()
    want_q, want_s = weight_quant(w.detach())
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    assert torch.equal(qt.view(torch.uint8), want_q.t().view(torch.uint8)) and torch.equal(st, want_s.t())
    assert qt.is_contiguous() and st.is_contiguous()
    with_t = fp8_run(x, w, dy, weight_q=(q, s, qt, st))
    without = fp8_run(x, w, dy, weight_q=(want_q, want_s))
    assert all(torch.equal(a, b) for a, b in zip(with_t, without, strict=True))


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
def test_output_gradient_is_quantized_in_one_read(monkeypatch, wgrad):
    """Backward quantizes ``dy`` once: in the fp8 Wgrad mode both FP8 copies (1x128 for Dgrad, 128x1 for Wgrad)
    come from one ``act_quant_with_t`` (one kernel, one read of ``dy`` on the GPU); in the bf16 mode only
    Dgrad's copy is made. The gradients are bitwise those of ``fp8_dgrad`` and ``fp8_wgrad``/``bf16_wgrad``,
    which quantize on their own."""
    x, w, dy = make(seed=4)
    calls = []
    for name in ("act_quant", "act_quant_t", "act_quant_with_t"):
        real = getattr(fp8_linear_module, name)
        monkeypatch.setattr(fp8_linear_module, name, lambda *a, real=real, name=name, **k: calls.append(name)
                            or real(*a, **k))
    y = fp8_linear(x, w, wgrad=wgrad)
    calls.clear()
    y.backward(dy)
    assert calls == (["act_quant_with_t"] if wgrad == "fp8" else ["act_quant"])
    x2, dy2 = x.detach().reshape(300, 256), dy.reshape(300, 384)
    w_q, w_s = weight_quant(w.detach())
    x_q, x_s = act_quant(x2)
    want_dw = fp8_wgrad(dy2, x_q, x_s) if wgrad == "fp8" else bf16_wgrad(dy2, x_q, x_s)
    assert torch.equal(x.grad.reshape(300, 256), fp8_dgrad(dy2, w_q, w_s)) and torch.equal(w.grad, want_dw)


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
def test_deferred_wgrad_holds_only_what_its_gemm_reads(wgrad):
    """A deferred FP8 Wgrad keeps the FP8 ``x`` and, in the fp8 mode, the FP8 128x1 copy of ``dy`` (a byte a
    value), not ``dy`` itself (4 bytes here); in the bf16 mode it keeps ``dy``. Run later, it gives backward's
    gradient bitwise."""
    x, w, dy = make(seed=5)
    queued = []
    fp8_linear(x, w, wgrad=wgrad, defer_wgrad=lambda weight, fn: queued.append(fn) or True).backward(dy)
    assert w.grad is None and len(queued) == 1
    held = {t.data_ptr(): t for t in queued[0].args if isinstance(t, torch.Tensor)}.values()
    x_bytes = 300 * 256 + 300 * 2 * 4  # x_q and its 1x128 scales
    dy_bytes = 384 * 300 + 384 * 3 * 4 if wgrad == "fp8" else dy.numel() * dy.element_size()
    assert sum(t.numel() * t.element_size() for t in held) == x_bytes + dy_bytes
    assert torch.equal(queued[0](), fp8_run(x, w, dy, wgrad=wgrad)[2])


@pytest.mark.parametrize("transposed", [False, True])
def test_padded_weight_is_cached_and_changes_nothing(monkeypatch, transposed):
    """Widths that are not whole 128-blocks (V3's 576-wide ``wkv_a``): on a GPU cuBLAS wants them zero-padded.
    ``Fp8WeightCache.padded()`` keeps the padded weight (and transposed copy) per quantization, which Fprop and
    Dgrad read instead of padding the weight on every call; results bitwise those of per-call padding. The
    CPU runs the reference unpadded (``padded()`` is None); here an SM90 GPU is stood in for: its plan, and
    ``scaled_mm`` replaced by the reference on the operands it is given."""
    import haillm.fp8.gemm as gemm

    x, w, dy = make(t2=75, k=200, n=576, seed=5)
    assert Fp8WeightCache(w, transposed=transposed).padded() is None  # CPU: nothing padded, nothing kept
    b_operands = []

    def scaled_mm(a, a_s, b, b_s, out_dtype=torch.bfloat16, *, b_block=128):
        b_operands.append(b)
        return gemm.fp8_gemm_reference(a, a_s, b, b_s, b_block).to(out_dtype)

    monkeypatch.setattr(gemm, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(gemm, "fp8_gemm_scaled_mm", scaled_mm)
    cache = Fp8WeightCache(w, transposed=transposed)
    padded = cache.padded()
    assert cache.padded() is padded and len(padded) == (4 if transposed else 2)
    q, s, *qt = cache.get()
    assert padded[0].shape == (640, 256) and torch.equal(padded[0][:576, :200].view(torch.uint8), q.view(torch.uint8))
    assert not padded[0][576:].view(torch.uint8).any() and not padded[0][:, 200:].view(torch.uint8).any()
    assert torch.equal(padded[1], s)  # 5 x 2 blocks either way: no scale row is added
    if transposed:
        assert padded[2].shape == (256, 640)
        assert torch.equal(padded[2].view(torch.uint8), padded[0].t().view(torch.uint8))
        assert padded[2].is_contiguous() and torch.equal(padded[3], qt[1])

    cached = fp8_run(x, w, dy, weight_q=cache.get(), weight_padded=padded)
    assert b_operands[0] is padded[0]  # Fprop read the kept copy
    if transposed:
        assert b_operands[1] is padded[2]  # and Dgrad the kept transposed copy
    per_call = fp8_run(x, w, dy, weight_q=cache.get())
    assert all(torch.equal(a, b) for a, b in zip(cached, per_call, strict=True))

    torch.optim.SGD([w], lr=0.1).step()  # a new quantization: a new padded copy, of the new weight
    assert cache.padded() is not padded and torch.equal(cache.padded()[0][:576, :200].view(torch.uint8),
                                                         cache.get()[0].view(torch.uint8))
