"""Deferred weight gradients (the zero-bubble B/W split) for linear layers.

``deferrable_linear`` is ``F.linear`` with a backward that always computes the input gradient at once and,
while :func:`deferring_weight_grads` is active, queues the weight (and bias) gradient as a closure instead
of computing it. ``ops.Linear`` routes through it when its ``defer_wgrad`` flag is on (pipeline stages with
I/W actions turn it on), so every linear layer of the model, experts included, can defer. The pipeline
runtime runs an ``I`` action as an ordinary backward inside that context and the matching ``W`` action
runs the queued closures, so the sum of I and W is exactly a full backward. Parameters of other ops (norms,
embedding, the router) simply get their gradient during I: deferral is an optimisation, never a condition
for correctness. Outside the context the op is bitwise ``F.linear``, forward and backward.

The queue is one module-level list, not thread-local, because on GPU the autograd engine runs backward
functions on its device thread, not on the thread that called ``backward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from haillm.ops import precision
from haillm.ops.precision import autocast_off

_queue: list[Callable[[], None]] | None = None


@contextlib.contextmanager
def deferring_weight_grads() -> Iterator[list[Callable[[], None]]]:
    """Within the block, weight grads of ``deferrable_linear`` are queued in the yielded list; run each
    closure later to accumulate them into ``.grad``."""
    global _queue
    if _queue is not None:
        raise RuntimeError("weight-grad deferral is already active (nested I backward?)")
    _queue = []
    try:
        yield _queue
    finally:
        _queue = None


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param``'s fp32 ``main_grad`` (ZeRO-1's gradient buffer) += grad, else ``param.grad`` += grad."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        main_grad.add_(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def defer_weight_grad(param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> bool:
    """For custom linear ops (the FP8 one): inside :func:`deferring_weight_grads` queue
    ``param.grad += compute()`` and return True; outside return False, and the caller returns the gradient
    from its backward as usual. ``compute`` must only read tensors the backward already holds."""
    if _queue is None:
        return False

    def deferred() -> None:
        with torch.no_grad():
            _accumulate(param, compute())

    _queue.append(deferred)
    return True


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        # The parameters themselves, not saved copies: a saved-tensor hook (activation recomputation) may
        # unpack a leaf as another tensor object, and the deferred closure must accumulate into the parameter.
        ctx.weight, ctx.bias = weight, bias
        # Under autocast the GEMMs run in its dtype, as F.linear's would; the parameters keep theirs.
        device = x.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return precision.linear(x.to(ctx.dtype), weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype))

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight, dtype = ctx.weight, ctx.dtype
        dy = dy.to(dtype)
        grad_x = precision.matmul(dy, weight.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        want_w, want_b = ctx.needs_input_grad[1], ctx.bias is not None and ctx.needs_input_grad[2]
        if not (want_w or want_b):
            return grad_x, None, None

        def weight_grads() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            dy2 = dy.reshape(-1, dy.shape[-1])
            gw = precision.matmul(dy2.t(), x.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype) if want_w else None
            gb = dy2.sum(0).to(ctx.bias.dtype) if want_b else None
            return gw, gb

        if _queue is None:
            return (grad_x, *weight_grads())
        bias = ctx.bias

        def deferred() -> None:
            with torch.no_grad():  # as inside backward: no graph through the saved input
                gw, gb = weight_grads()
            if gw is not None:
                _accumulate(weight, gw)
            if gb is not None:
                _accumulate(bias, gb)

        _queue.append(deferred)
        return grad_x, None, None


def deferrable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient can be deferred (see module docstring)."""
    return _DeferrableLinear.apply(x, weight, bias)
