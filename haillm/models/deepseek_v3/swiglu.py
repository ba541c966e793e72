"""SwiGLU that keeps only its inputs for backward (DeepSeek-V3 report §3.3.2: "we cache the inputs of the
SwiGLU operator and recompute its output in the backward pass").

``swiglu_keeping_inputs(a, b, probs, pow2)`` returns ``h = silu(a) * b`` (times the routed copy's gate weight
``probs`` when given) for the down projection ``w2``, with its FP8 copy when ``pow2`` is not None (``w2`` in
FP8). Backward keeps ``a`` and ``b`` (and ``probs``), nothing else: ``h`` (or its FP8 copy) is marked for
recomputation (``haillm.ops.recompute``) from them, so ``w2`` stores the recipe and recomputes it for its
weight gradient. With ``w2`` in FP8 the inputs are kept as FP8 with 1x128 scales too, the report's choice;
backward then reads them dequantized.

Applying the gate weight before ``w2`` instead of to ``w2``'s output is what lets the MoE combine keep nothing
(its backward is a gather of the output gradient) and no routed copy keep its output: the gate weight's
gradient is ``<dh_unweighted, silu(a) * b>`` here, from the kept inputs.

Numerics: without FP8 and without ``probs`` every value and gradient is bitwise the plain
``w2(silu(a) * b)``'s. ``probs`` before ``w2`` changes the rounding of one product (``w2(g h)`` against
``g w2(h)``): equal in exact arithmetic. FP8 inputs add their 1x128-tile quantization error to backward
(the same order as the FP8 ``dy`` the GEMMs already read). tests/test_moe_memory.py states the bounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from haillm.fp8.fused import swiglu_grads
from haillm.fp8.quant import Fp8Pair, act_dequant, act_quant
from haillm.ops.recompute import mark_outputs


def _unpack(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` from what was kept: themselves, or their FP8 pairs ``(a_q, a_s, b_q, b_s)``."""
    if len(inputs) == 2:
        return inputs[0], inputs[1]
    return act_dequant(*inputs[:2], dtype=dtype), act_dequant(*inputs[2:], dtype=dtype)


def _gated(a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    h = F.silu(a) * b
    return h if probs is None else h * probs.unsqueeze(-1).type_as(h)


def _recompute_output(dtype: torch.dtype, pow2: bool | None, probs: torch.Tensor | None,
                      *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The recipe of ``h`` (and its FP8 copy): the forward's formula on the kept inputs."""
    h = _gated(*_unpack(inputs, dtype), probs)
    return (h,) if pow2 is None else (h, *act_quant(h, pow2=pow2))


class _SwiGLUKeepingInputs(torch.autograd.Function):
    """``kept``: ``(a, b)`` themselves, or their FP8 pairs; backward reads only those and ``probs``."""

    @staticmethod
    def forward(ctx, a, b, probs, pow2, *kept):
        h = _gated(a, b, probs)
        ctx.save_for_backward(probs, *kept)
        ctx.dtype = a.dtype
        ctx.set_materialize_grads(False)
        if pow2 is None:
            return h
        h_q, h_s = act_quant(h, pow2=pow2)
        ctx.mark_non_differentiable(h_q, h_s)
        return h, h_q, h_s

    @staticmethod
    def backward(ctx, dh, *_):
        probs, *kept = ctx.saved_tensors
        n_kept = len(kept)
        if dh is None:
            return (None,) * (4 + n_kept)
        a, b = _unpack(tuple(kept), ctx.dtype)
        silu = F.silu(a)
        dprobs = None
        if probs is not None:
            if ctx.needs_input_grad[2]:
                dprobs = (dh.float() * (silu * b).float()).sum(-1)
            dh = dh * probs.unsqueeze(-1).type_as(dh)
        return *swiglu_grads(dh, a, b, ctx.needs_input_grad[:2], silu), dprobs, None, *(None,) * n_kept


def swiglu_keeping_inputs(a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor | None = None,
                          pow2: bool | None = None) -> tuple[torch.Tensor, Fp8Pair | None]:
    """``h = silu(a) * b [* probs]`` (differentiable to ``a``, ``b`` and ``probs``) and, when ``pow2`` is not
    None, ``act_quant(h, pow2=pow2)`` for an FP8 ``w2``. Keeps ``a``, ``b`` (FP8 when ``pow2`` is not None)
    and ``probs``; ``h`` and its FP8 copy are recomputed from them wherever a consumer saves them (while
    ``recompute.keeping_recipes`` is active: the model's ``set_recompute(..., swiglu=True)``)."""
    if pow2 is None:
        kept: tuple[torch.Tensor, ...] = (a, b)
    else:
        kept = (*act_quant(a.detach(), pow2=pow2), *act_quant(b.detach(), pow2=pow2))
    out = _SwiGLUKeepingInputs.apply(a, b, probs, pow2, *kept)
    outputs = (out,) if pow2 is None else out
    if torch.is_grad_enabled():
        mark_outputs(outputs, _recompute_output, a.dtype, pow2, probs, *kept)
    return outputs[0], (None if pow2 is None else (outputs[1], outputs[2]))
