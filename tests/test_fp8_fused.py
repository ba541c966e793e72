"""FP8 quantization fused into its producers (``haillm.fp8.fused``): RMSNorm and SwiGLU that also return the
FP8 copy of their output, FP8 linears that take that copy, and the model plumbing.

CPU: the fused ops are bitwise the unfused composition (outputs, FP8 pair and gradients); ``Linear`` with a
ready ``x_fp8`` is bitwise ``Linear`` quantizing on its own; the FP8 tiny model with fusion gives bitwise the
loss and gradients of the unfused path (with and without recomputation) while quantizing fewer times.

GPU (``gpu``): the Triton kernels against the torch reference. Their FP8 pair must be bitwise
``act_quant_reference`` of the kernel's own output. The output itself is compared with torch's:
- RMSNorm: the kernel sums the squares in another order (and takes ``1 / sqrt`` where torch takes ``rsqrt``),
  so ``rstd`` differs by a few fp32 ulps: an fp32 output within 8e-6 relative. A bf16 output is that fp32
  value rounded, so it differs by at most one bf16 ulp, where the two fp32 values straddle a rounding
  boundary: 2^-7 of |y|.
- SwiGLU: libdevice's ``exp`` against CUDA's ``expf`` (each within 2 ulps): an fp32 output within 1e-5
  relative (bound on |h| + 1e-30). In bf16, ``silu(a)`` may land one bf16 ulp (2^-7 relative) away and the
  product is rounded again (2^-8 relative each side): a little over 2^-6 of |h| at worst; bound 2^-5.
  Their gradients are bitwise torch's: backward runs torch's own ops on the saved inputs.
"""


import pytest
import torch
import torch.nn.functional as F

import haillm.fp8.linear as fp8_linear_module
from haillm.fp8 import FP8_DTYPE, act_quant
from haillm.fp8.fused import fp8_input_pow2, fusion, kernel_applies, rmsnorm_act_quant, swiglu_act_quant
from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_fp8
from haillm.fp8.quant import act_quant_reference
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops import Linear, RMSNorm

gpu = pytest.mark.gpu
WIDTHS = [2048, 7168, 1408, 1536, 576, 160]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (FP8 compared as bytes; NaN never occurs in these tests)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8_DTYPE else torch.equal(a, b)


def inputs(t: int, k: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``x`` with rows of very different magnitude, a norm weight around 1, SwiGLU operands ``a``, ``b``."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, k, generator=g, device=device) * 10.0 ** torch.randint(-2, 3, (t, 1), generator=g, device=device)
    w = 1 + 0.1 * torch.randn(k, generator=g, device=device)
    a, b = 4 * torch.randn(t, k, generator=g, device=device), torch.randn(t, k, generator=g, device=device)
    return tuple(v.to(dtype) for v in (x, w, a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("k", [160, 200, 576])
def test_fused_ops_are_the_unfused_composition(k, pow2, dtype):
    """CPU path: outputs, FP8 pair and every gradient bitwise those of RMSNorm / ``F.silu(a) * b`` then
    ``act_quant`` (odd widths: partial last tiles)."""
    x, w, a, b = inputs(37, k, dtype)
    dy = torch.randn(37, k).to(dtype)
    assert not kernel_applies(x)

    norm = RMSNorm(k, eps=1e-6)
    norm.weight.data.copy_(w)
    x0 = x.clone().requires_grad_()
    y0 = norm(x0)
    y0.backward(dy)
    x1, w1 = x.clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    y1, q1, s1 = rmsnorm_act_quant(x1, w1, 1e-6, pow2)
    assert not q1.requires_grad and not s1.requires_grad
    y1.backward(dy)
    assert same_bits(y1, y0) and all(map(same_bits, (q1, s1), act_quant(y0.detach(), pow2=pow2)))
    assert same_bits(x1.grad, x0.grad) and same_bits(w1.grad, norm.weight.grad)

    a0, b0 = a.clone().requires_grad_(), b.clone().requires_grad_()
    h0 = F.silu(a0) * b0
    h0.backward(dy)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    h1, hq, hs = swiglu_act_quant(a1, b1, pow2)
    h1.backward(dy)
    assert same_bits(h1, h0) and all(map(same_bits, (hq, hs), act_quant(h0.detach(), pow2=pow2)))
    assert same_bits(a1.grad, a0.grad) and same_bits(b1.grad, b0.grad)


def test_fused_swiglu_keeps_only_its_inputs():
    a, b = (torch.randn(8, 256, requires_grad=True) for _ in range(2))
    h, _, _ = swiglu_act_quant(a, b)
    assert len(h.grad_fn.saved_tensors) == 2  # a and b; silu(a) is recomputed in backward
    with pytest.raises(ValueError, match="one shape"):
        swiglu_act_quant(a, b[:, :128])


@pytest.mark.parametrize("pow2", [False, True])
def test_linear_with_ready_fp8_input(pow2):
    """``Linear`` in "fp8" given ``x_fp8 = act_quant(x)``: output and both gradients bitwise those of the same
    linear quantizing ``x`` itself, with one quantization fewer; other precisions ignore ``x_fp8``."""
    g = torch.Generator().manual_seed(0)
    lin = Linear(256, 384)
    lin.weight.data.copy_(torch.randn(384, 256, generator=g) / 16)
    lin.set_precision("fp8", pow2_scales=pow2)
    x, dy = torch.randn(2, 150, 256, generator=g), torch.randn(2, 150, 384, generator=g)

    def run(x_fp8) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_()
        lin.weight.grad = None
        y = lin(xi, x_fp8)
        y.backward(dy)
        return [y, xi.grad, lin.weight.grad]

    plain = run(None)
    given = run(act_quant(x, pow2=pow2))
    assert all(map(same_bits, given, plain))
    wrong = run(act_quant(x, pow2=not pow2))  # a pair of other scales: the forward must use what it is given
    assert not torch.equal(wrong[0], plain[0])
    with pytest.raises(ValueError, match="x_fp8 must quantize x"):
        lin(x, act_quant(x[0]))
    lin.set_precision("default")
    assert same_bits(lin(x, act_quant(x[0])), lin(x))


def test_fp8_input_pow2_rule():
    w1, w3 = Linear(256, 128), Linear(256, 128)
    assert fp8_input_pow2([w1, w3]) is None  # nothing in FP8
    w1.set_precision("fp8", pow2_scales=True)
    assert fp8_input_pow2([w1, w3]) is True  # one FP8 consumer is enough
    w3.set_precision("fp8")
    assert fp8_input_pow2([w1, w3]) is None  # disagreeing scale formats share nothing
    w1.set_precision("fp8")
    assert fp8_input_pow2([w1, w3]) is False
    with fusion(False):
        assert fp8_input_pow2([w1, w3]) is None
    assert fp8_input_pow2([w1, w3]) is False


def tiny_fp8_model(pow2: bool, q_lora_rank: int, dim: int = FP8_TINY_OVERRIDES["dim"]) -> DeepSeekV3:
    """Dense layer 0, MoE layer 1 with a shared expert, one MTP block; every FFN linear in FP8, MLA's wq_a
    (or wq) and wkv_a (160 wide: a partial block) reading the attention norm in FP8."""
    overrides = {**FP8_TINY_OVERRIDES, "n_layers": 2, "mtp_depth": 1, "q_lora_rank": q_lora_rank, "dim": dim}
    args = get_preset("tiny").replace(**overrides)
    model = DeepSeekV3(args, init_seed=0)
    report = apply_fp8(model, enabled=True, pow2_scales=pow2)
    q_in = "layers.0.attn.wq_a" if q_lora_rank else "layers.0.attn.wq"
    assert "layers.0.attn.wkv_a" in report.low and q_in in report.low
    return model


@pytest.mark.parametrize("pow2, recompute, q_lora_rank, dim",
                         [(False, False, 128, 256), (True, True, 128, 256), (False, True, 0, 256),
                          (False, False, 128, 192)])
def test_model_fusion_changes_no_bit(pow2, recompute, q_lora_rank, dim, monkeypatch):
    """Loss and every gradient bitwise the same with fusion on and off (off is the path before fusion). Fused,
    the FP8 linears quantize their input themselves fewer times: per block, wq_a or wq and wkv_a (their norm's
    pair), wq_b (q_norm's), wkv_b (kv_norm's), wo (attention's output, quantized by MLA where it marks wo's
    input for recomputation), and w1, w3, w2 of the dense FFN or of the shared experts;
    per MTP module eh_proj (enorm's and hnorm's pairs side by side, when dim is whole tiles; 192 is not).
    Handing a linear another tensor's pair changes the loss. With recomputation the fused norm outputs and
    MLA's up-projections (wq's pair, q_norm's and kv_norm's fused outputs inside them) are recomputed."""
    calls = []
    quantize = fp8_linear_module.act_quant
    monkeypatch.setattr(fp8_linear_module, "act_quant", lambda *a, **k: calls.append(1) or quantize(*a, **k))
    model = tiny_fp8_model(pow2, q_lora_rank, dim)
    model.set_recompute(recompute)
    batch = torch.randint(0, model.args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))

    def step(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad()
        calls.clear()
        with fusion(fused):
            loss = model.compute_loss(batch)["loss"]
        forward_quantizations = len(calls)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
            forward_quantizations

    loss, grads, n_fused = step(True)
    loss_ref, grads_ref, n_unfused = step(False)
    blocks = model.args.n_layers + model.args.mtp_depth
    per_block = 6 + (2 if q_lora_rank else 1)
    assert n_unfused - n_fused == per_block * blocks + (model.args.mtp_depth if dim % 128 == 0 else 0)
    assert same_bits(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and all(same_bits(grads[n], grads_ref[n]) for n in grads)


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", WIDTHS)
def test_rmsnorm_kernel(k, dtype, pow2):
    x, w, _, _ = inputs(300, k, dtype, "cuda", seed=k)
    w = w.float()  # the norm weight is an fp32 parameter
    assert kernel_applies(x)
    y, q, s = rmsnorm_act_quant(x, w, 1e-6, pow2)
    assert y.dtype == dtype and y.shape == x.shape
    assert all(map(same_bits, (q, s), act_quant_reference(y, pow2=pow2)))
    ref = RMSNorm(k, eps=1e-6).cuda()
    ref.weight.data.copy_(w)
    y_ref = ref(x)
    bound = {torch.float32: 8e-6, torch.bfloat16: 2.0**-7}[dtype]
    assert ((y.float() - y_ref.float()).abs() <= bound * y_ref.float().abs()).all()

    # backward is RMSNorm's own, on the kernel's rstd: close to torch's gradients
    xg, wg, xr = x.clone().requires_grad_(), w.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(y)
    rmsnorm_act_quant(xg, wg, 1e-6, pow2)[0].backward(dy)
    ref(xr).backward(dy)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(xg.grad.float(), xr.grad.float(), rtol=rel, atol=rel * xr.grad.float().abs().max())
    assert torch.allclose(wg.grad, ref.weight.grad, rtol=rel, atol=rel * ref.weight.grad.abs().max())


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", WIDTHS)
def test_swiglu_kernel(k, dtype, pow2):
    _, _, a, b = inputs(300, k, dtype, "cuda", seed=k)
    assert kernel_applies(a)
    a_g, b_g = a.clone().requires_grad_(), b.clone().requires_grad_()
    h, q, s = swiglu_act_quant(a_g, b_g, pow2)
    assert h.dtype == dtype and h.shape == a.shape
    assert all(map(same_bits, (q, s), act_quant_reference(h.detach(), pow2=pow2)))
    a_r, b_r = a.clone().requires_grad_(), b.clone().requires_grad_()
    h_ref = F.silu(a_r) * b_r
    bound = {torch.float32: 1e-5, torch.bfloat16: 2.0**-5}[dtype]
    assert ((h.detach().float() - h_ref.detach().float()).abs() <= bound * h_ref.detach().float().abs() + 1e-30).all()
    dh = torch.randn_like(h)
    h.backward(dh)
    h_ref.backward(dh)
    assert same_bits(a_g.grad, a_r.grad) and same_bits(b_g.grad, b_r.grad)  # torch's own backward ops


@gpu
def test_kernels_take_strided_and_batched_inputs():
    x, w, a, b = inputs(300, 1000, torch.bfloat16, "cuda", seed=1)
    w = w.float()
    for view in (x.t(), x[7:, 100:], x.view(3, 100, 1000)):
        y, q, s = rmsnorm_act_quant(view, w[: view.shape[-1]], 1e-6, True)
        assert y.shape == view.shape and s.shape == (*view.shape[:-1], -(-view.shape[-1] // 128))
        assert all(map(same_bits, (q, s), act_quant_reference(y, pow2=True)))
    for va, vb in ((a.t(), b.t()), (a.view(3, 100, 1000), b.view(3, 100, 1000))):
        h, q, s = swiglu_act_quant(va, vb, False)
        assert h.shape == va.shape
        assert all(map(same_bits, (q, s), act_quant_reference(h)))
