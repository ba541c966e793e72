"""Low-precision GEMMs that run everywhere: on a GPU the native BF16 kernels, on a CPU the same numerics
with fp32 arithmetic.

A BF16 GEMM on a GPU reads bf16 operands, accumulates in fp32 and rounds the result to bf16. Many CPUs have
no fast bf16 matmul (../shared/MACHINE.md measured 340x slower than fp32 on one of our test machines), so
on CPU the operands, already bf16, are widened to fp32, multiplied, and the result rounded back to bf16:
the GPU's arithmetic up to the order of the fp32 additions. Autograd runs through the casts, so the
backward GEMMs get the same treatment (their bf16 inputs widened, their results rounded to the
parameter's or activation's dtype). On a GPU, and for fp32 tensors anywhere, these are the plain ops.

Every GEMM of the model whose operands may be bf16 goes through here; the choice depends only on the
device, never on a CPU measurement, so nothing decided here changes what a GPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.bfloat16, torch.float16)


def widens(*tensors: torch.Tensor | None) -> bool:
    """True when a GEMM over ``tensors`` runs emulated: on CPU with any operand in bf16 or fp16."""
    return any(t is not None and t.device.type == "cpu" and t.dtype in LOW_PRECISION for t in tensors)


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in the inputs' dtype (bf16 on CPU: fp32 arithmetic, result rounded to ``x.dtype``)."""
    if not widens(x, weight, bias):
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), _wide(bias)).to(x.dtype)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (2-D) in ``a``'s dtype, into ``out`` when given; no autograd through ``out``."""
    if not widens(a, b):
        return torch.mm(a, b, out=out)
    result = torch.mm(a.float(), b.float())
    return result.to(a.dtype) if out is None else out.copy_(result)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` in ``a``'s dtype (bf16 on CPU: fp32 arithmetic)."""
    if not widens(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    return torch._grouped_mm(a.float(), b.float(), offs=offs).to(a.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal ``F.scaled_dot_product_attention`` in ``q``'s dtype (bf16 on CPU: fp32 arithmetic)."""
    if not widens(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale)
    return out.to(q.dtype)
