"""The model's hand-written fast paths against the obvious autograd compositions they replace."""

import torch
import torch.nn.functional as F

from haillm.ops import RMSNorm
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
