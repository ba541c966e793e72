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

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in ``a``'s dtype (bf16 on CPU: fp32 arithmetic)."""
    if not widens(a, b):
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)


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


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters (not buffers: the gate's balancing bias, load counters and rope tables stay fp32) to
    ``dtype``, in place; the compute copy of mixed-precision training. Returns ``module``."""
    for p in module.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def apply_like_autocast(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)`` as autocast runs a low-precision op: when autocast is on for the inputs'
    device, floating tensors are cast to its dtype and the Function runs with autocast off (its backward
    must be wrapped in ``autocast_off`` too, since a backward called inside an autocast block runs under it).
    Without autocast, plain ``apply``: the Function then works in its inputs' own dtypes."""
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if not torch.is_autocast_enabled(device):
        return function.apply(*args)
    dtype = torch.get_autocast_dtype(device)
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device, enabled=False):
        return function.apply(*args)


def autocast_off(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for an autograd Function's ``backward``: run it with autocast off on the gradients' device,
    so its GEMMs keep the dtypes forward chose (see ``apply_like_autocast``)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: torch.Tensor | None) -> Any:
        device = next(g.device.type for g in grads if isinstance(g, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return wrapped
