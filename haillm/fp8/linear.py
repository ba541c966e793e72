"""FP8 linear ``y = x @ W.T`` with all three GEMMs in FP8, as DeepSeek-V3 trains its linears.

- Fprop: ``x`` 1x128 tiles (per token) x ``W`` 128x128 blocks.
- Dgrad: ``dx = dy @ W``: ``dy`` 1x128 tiles x ``W.T`` 128x128 blocks. Square blocks make the quantized
  ``W.T`` just the transposed ``(q, s)`` of ``W``: same blocks, same amax, no requantization.
- Wgrad: ``dW = dy.T @ x``: both operands tiled 1x128 along the token dimension (K of this GEMM).
  ``dy.T`` is quantized from the high-precision gradient; ``x.T`` is re-tiled from the FP8 copy of ``x``
  saved in forward (``requant_t``), so only FP8 activations are kept between forward and backward.

Under zero-bubble pipeline schedules the Wgrad GEMM can be deferred (``defer_wgrad``): backward then
queues it, holding only the FP8 ``x`` and the output gradient, and a later W action runs it. Weight
quantization can be done once per optimizer step and shared by all micro-batches through ``Fp8WeightCache``.
"""

from collections.abc import Callable

import torch

from haillm.fp8.gemm import fp8_gemm
from haillm.fp8.quant import GRAD_AMAX_MIN, act_quant, act_quant_t, requant_t, weight_quant


def fp8_dgrad(
    dy: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, pow2: bool = False, out_dtype=torch.float32
) -> torch.Tensor:
    """Input gradient ``dy [T, N] @ W [N, K]`` from ``(w_q, w_s) = weight_quant(W)``."""
    dy_q, dy_s = act_quant(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN)
    return fp8_gemm(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), out_dtype)


def fp8_wgrad(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, pow2: bool = False, out_dtype=torch.float32
) -> torch.Tensor:
    """Weight gradient ``dy.T [N, T] @ x [T, K]``, contracting over tokens, from ``act_quant(x)``'s pair."""
    dyt_q, dyt_s = act_quant_t(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN)
    xt_q, xt_s = requant_t(x_q, x_s, pow2=pow2)
    return fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, out_dtype, b_block=1)


class Fp8LinearFunction(torch.autograd.Function):
    """Autograd op for ``x @ W.T`` in FP8; saves only FP8 tensors and their fp32 scales for backward."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_s, pow2, defer_wgrad, x_fp8=None):
        x2 = x.reshape(-1, x.shape[-1])
        if x_fp8 is None:
            x_q, x_s = act_quant(x2, pow2=pow2)
        else:  # the producer of x quantized it already (haillm.fp8.fused)
            x_q, x_s = x_fp8[0].reshape(x2.shape), x_fp8[1].reshape(x2.shape[0], -1)
        y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=x.dtype)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.pow2, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = pow2, x.shape, x.dtype, weight.dtype
        # The parameter itself (not a saved tensor) receives a deferred gradient; see ops.wgrad.
        ctx.weight, ctx.defer_wgrad = weight, defer_wgrad
        return y.reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = fp8_dgrad(dy2, w_q, w_s, ctx.pow2, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            pow2, w_dtype = ctx.pow2, ctx.w_dtype

            def weight_grad() -> torch.Tensor:
                return fp8_wgrad(dy2, x_q, x_s, pow2, w_dtype)

            if ctx.defer_wgrad is None or not ctx.defer_wgrad(ctx.weight, weight_grad):
                dw = weight_grad()
        return dx, dw, None, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    weight_q: tuple[torch.Tensor, torch.Tensor] | None = None,
    pow2: bool = False,
    defer_wgrad: Callable[[torch.Tensor, Callable[[], torch.Tensor]], bool] | None = None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (no bias) with FP8 Fprop/Dgrad/Wgrad; the output dtype follows ``x``.

    ``weight_q`` is a ready ``weight_quant(weight)`` (e.g. ``Fp8WeightCache.get()``); without it the weight
    is quantized on this call. ``x_fp8`` is a ready ``act_quant(x, pow2=pow2)`` (from the op that produced
    ``x``, ``haillm.fp8.fused``), used instead of quantizing ``x`` here; the gradient still flows to ``x``.
    ``defer_wgrad`` (``haillm.ops.wgrad.defer_weight_grad``) may take the Wgrad
    GEMM out of backward, to run later from the saved FP8 tensors (zero-bubble W). Any shape works through
    the reference GEMM on CPU and cuBLAS's on an SM90 GPU, zero-padded where it wants whole blocks
    (``gemm_plan``)."""
    w_q, w_s = weight_q if weight_q is not None else weight_quant(weight.detach(), pow2=pow2)
    if x_fp8 is not None and x_fp8[0].shape != x.shape:
        raise ValueError(f"x_fp8 must quantize x: shapes {tuple(x_fp8[0].shape)} and {tuple(x.shape)} differ")
    return Fp8LinearFunction.apply(x, weight, w_q, w_s, pow2, defer_wgrad, x_fp8)


class Fp8WeightCache:
    """The FP8 copy of one weight, requantized only when the weight changed: once per optimizer step, then
    reused by every micro-batch. Change is detected through ``weight._version`` (bumped by in-place
    updates such as ``optimizer.step()``) and the storage pointer; writes through ``weight.data`` are not
    seen by ``_version``, so code that updates weights that way must call ``invalidate()``."""

    def __init__(self, weight: torch.Tensor, pow2: bool = False):
        self.weight, self.pow2 = weight, pow2
        self._key: tuple[int, int] | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def invalidate(self) -> None:
        self._key = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight._version, self.weight.data_ptr())
        if key != self._key or self._value is None:
            self._value = weight_quant(self.weight.detach(), pow2=self.pow2)
            self._key = key
        return self._value
