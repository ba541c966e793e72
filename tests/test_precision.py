"""ops.precision: BF16 GEMMs on CPU are fp32 arithmetic on the bf16 operands, rounded to bf16."""

import torch
import torch.nn.functional as F

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
