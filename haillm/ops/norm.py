"""RMSNorm with a hand-written backward (same maths as DeepSeek's and Hugging Face's).

On CPU ``F.rms_norm`` is a composite of about six elementwise ops whose autograd graph adds about ten more in
backward; one ``autograd.Function`` with the closed-form gradient does the same work in half the ops and
memory passes (about 2x faster fwd+bwd at the model's sizes). The forward is bitwise ``F.rms_norm``'s.
"""

import torch
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    """``y = x * r * w`` with ``r = rsqrt(mean(x^2) + eps)``, computed in fp32 (or wider) and cast back to x's
    dtype. Gradients: ``dx = r * (g w - x_hat * mean(g w x_hat))``, ``dw = sum(g x_hat)`` with ``x_hat = x r``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        rstd = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return torch.mul(xf, rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd
        g = grad.to(rstd.dtype)
        g_x_hat = g * x_hat  # the few fresh activation-sized tensors are what costs here; the rest is in place
        dw = g_x_hat.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dot = g_x_hat.mul_(weight).mean(-1, keepdim=True)
            dx = (g * weight).sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``; weight starts at ones."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
