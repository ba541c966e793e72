"""FP8 linear ``y = x @ W.T`` with all three GEMMs in FP8, as DeepSeek-V3 trains its linears.

- Fprop: ``x`` 1x128 tiles (per token) x ``W`` 128x128 blocks.
- Dgrad: ``dx = dy @ W``: ``dy`` 1x128 tiles x ``W.T`` 128x128 blocks. Square blocks make the quantized
  ``W.T`` just the transposed ``(q, s)`` of ``W``: same blocks, same amax, no requantization.
- Wgrad ``dW = dy.T @ x``, in one of two modes (``wgrad``); either way only the FP8 copy of ``x`` is kept
  between forward and backward:
  - ``"bf16"`` (default): a BF16 GEMM of ``dy`` rounded to bf16 and the bf16 dequantization of the saved
    FP8 ``x``. On an H200 (torch 2.11, cuBLAS) the blockwise FP8 Wgrad ran at 0.90x and 0.99x of BF16 at
    V3's shapes even with its operands quantized beforehand, and at 0.3-0.6x with the two quantizations
    it needs (issue #12's table; ``bench/gpu_fp8.py`` prints it again per shape), so BF16 is both faster
    and more precise there.
  - ``"fp8"``: DeepSeek-V3's recipe (DeepGEMM has a fast kernel for it): both operands tiled 1x128 along
    the token dimension (K of this GEMM); ``dy.T`` quantized from the high-precision gradient, in the same
    read of ``dy`` as Dgrad's 1x128 copy (``act_quant_with_t``), ``x.T`` re-tiled from the FP8 copy of ``x``
    (``requant_t``).

Under zero-bubble pipeline schedules the Wgrad GEMM can be deferred (``defer_wgrad``): backward then
queues it, holding only the FP8 ``x`` and the output gradient (bf16, or FP8 128x1 in the "fp8" mode), and a
later W action runs it. Weight quantization can be done once per optimizer step and shared by all
micro-batches through ``Fp8WeightCache``.
"""

import functools
from collections.abc import Callable

import torch

from haillm.fp8.gemm import fp8_gemm, padded_weight
from haillm.fp8.quant import (
    GRAD_AMAX_MIN,
    Fp8Pair,
    act_dequant,
    act_quant,
    act_quant_t,
    act_quant_with_t,
    requant_t,
    weight_quant,
    weight_quant_with_t,
)

WGRAD_MODES = ("bf16", "fp8")


def fp8_dgrad(
    dy: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    pow2: bool = False,
    out_dtype=torch.float32,
    w_t: Fp8Pair | None = None,
) -> torch.Tensor:
    """Input gradient ``dy [T, N] @ W [N, K]`` from ``(w_q, w_s) = weight_quant(W)``; ``w_t`` is its
    transposed contiguous copy ``(q.T, s.T)`` when already made (the GEMM wants ``W.T`` row-major)."""
    return dgrad_gemm(*act_quant(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN), w_q, w_s, out_dtype, w_t)


def dgrad_gemm(
    dy_q: torch.Tensor,
    dy_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype=torch.float32,
    w_t: Fp8Pair | None = None,
    w_padded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """``fp8_dgrad`` of an output gradient already quantized 1x128 (``act_quant(dy)``). ``w_padded`` is
    ``Fp8WeightCache.padded()`` (the weight, and with ``w_t`` its transposed copy, padded as cuBLAS wants
    them): the GEMM reads the padded transposed copy, or one transposing copy of the padded weight, instead
    of transposing and then padding."""
    if w_padded is not None:
        wt_padded = tuple(w_padded[2:]) or (w_padded[0].t().contiguous(), w_padded[1].t().contiguous())
        wt_q, wt_s = w_t if w_t is not None else (w_q.t(), w_s.t())  # shapes only: the padded GEMM reads wt_padded
        return fp8_gemm(dy_q, dy_s, wt_q, wt_s, out_dtype, b_padded=wt_padded)
    wt_q, wt_s = w_t if w_t is not None else (w_q.t().contiguous(), w_s.t().contiguous())
    return fp8_gemm(dy_q, dy_s, wt_q, wt_s, out_dtype)


def fp8_wgrad(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, pow2: bool = False, out_dtype=torch.float32
) -> torch.Tensor:
    """Weight gradient ``dy.T [N, T] @ x [T, K]``, contracting over tokens, from ``act_quant(x)``'s pair."""
    return wgrad_gemm(*act_quant_t(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN), x_q, x_s, pow2, out_dtype)


def wgrad_gemm(
    dyt_q: torch.Tensor, dyt_s: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, pow2: bool = False,
    out_dtype=torch.float32,
) -> torch.Tensor:
    """``fp8_wgrad`` of an output gradient already quantized 128x1 (``act_quant_t(dy)``)."""
    xt_q, xt_s = requant_t(x_q, x_s, pow2=pow2)
    return fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, out_dtype, b_block=1)


def bf16_wgrad(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """Weight gradient ``dy.T @ x`` as a BF16 GEMM (fp32 accumulation, bf16 result) of ``dy`` and the
    dequantized ``act_quant(x)`` pair, returned in ``out_dtype``."""
    from haillm.ops import precision  # here: haillm.ops imports this package

    x = act_dequant(x_q, x_s, dtype=torch.bfloat16)
    return precision.mm(dy.to(torch.bfloat16).t(), x).to(out_dtype)


def check_wgrad_mode(wgrad: str) -> None:
    if wgrad not in WGRAD_MODES:
        raise ValueError(f"fp8 wgrad mode must be one of {WGRAD_MODES}, got {wgrad!r}")


class Fp8LinearFunction(torch.autograd.Function):
    """Autograd op for ``x @ W.T`` in FP8; saves only FP8 tensors and their fp32 scales for backward."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_s, w_t, pow2, defer_wgrad, wgrad, x_fp8, w_padded=None):
        x2 = x.reshape(-1, x.shape[-1])
        if x_fp8 is None:
            x_q, x_s = act_quant(x2, pow2=pow2)
        else:  # the producer of x quantized it already (haillm.fp8.fused)
            x_q, x_s = x_fp8[0].reshape(x2.shape), x_fp8[1].reshape(x2.shape[0], -1)
        y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=x.dtype, b_padded=w_padded[:2] if w_padded else None)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.pow2, ctx.wgrad, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = pow2, wgrad, x.shape, x.dtype, weight.dtype
        ctx.w_t = w_t  # the cached transposed weight (or None): Dgrad's operand, not a new tensor
        ctx.w_padded = w_padded  # the cached padded copies (or None), as w_t
        # The parameter itself (not a saved tensor) receives a deferred gradient; see ops.wgrad.
        ctx.weight, ctx.defer_wgrad = weight, defer_wgrad
        return y.reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw = ctx.needs_input_grad[:2]
        pow2, w_dtype, wgrad = ctx.pow2, ctx.w_dtype, ctx.wgrad
        dy_fp8, dyt_fp8 = _quantized_output_grad(dy2, pow2, need_dx, need_dw and wgrad == "fp8")
        dx = dw = None
        if need_dx:
            dx = dgrad_gemm(*dy_fp8, w_q, w_s, ctx.x_dtype, ctx.w_t, ctx.w_padded).reshape(ctx.x_shape)
        if need_dw:
            # A deferred Wgrad holds only what its GEMM reads: the FP8 x, and dy in bf16 mode or its FP8 128x1
            # copy in fp8 mode (partials, not closures, so the fp8 mode does not keep dy alive too).
            if wgrad == "bf16":
                weight_grad = functools.partial(bf16_wgrad, dy2, x_q, x_s, w_dtype)
            else:
                weight_grad = functools.partial(wgrad_gemm, *dyt_fp8, x_q, x_s, pow2, w_dtype)

            if ctx.defer_wgrad is None or not ctx.defer_wgrad(ctx.weight, weight_grad):
                dw = weight_grad()
        return dx, dw, None, None, None, None, None, None, None, None


def _quantized_output_grad(dy: torch.Tensor, pow2: bool, rowwise: bool, columnwise: bool
                           ) -> tuple[Fp8Pair | None, Fp8Pair | None]:
    """The FP8 copies of ``dy`` that backward reads: 1x128 (``rowwise``, for Dgrad) and 128x1 (``columnwise``,
    for the FP8 Wgrad); both from one read of ``dy`` when both are needed (``act_quant_with_t``)."""
    if rowwise and columnwise:
        dy_q, dy_s, dyt_q, dyt_s = act_quant_with_t(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN)
        return (dy_q, dy_s), (dyt_q, dyt_s)
    rows = act_quant(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN) if rowwise else None
    return rows, act_quant_t(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN) if columnwise else None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    weight_q: tuple[torch.Tensor, ...] | None = None,
    pow2: bool = False,
    defer_wgrad: Callable[[torch.Tensor, Callable[[], torch.Tensor]], bool] | None = None,
    wgrad: str = "bf16",
    x_fp8: Fp8Pair | None = None,
    weight_padded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (no bias) with FP8 Fprop/Dgrad/Wgrad; the output dtype follows ``x``.

    ``weight_q`` is a ready ``weight_quant(weight)`` or ``weight_quant_with_t(weight)`` (e.g.
    ``Fp8WeightCache.get()``; with the transposed copy Dgrad need not transpose); without it the weight
    is quantized on this call. ``x_fp8`` is a ready ``act_quant(x, pow2=pow2)`` (from the op that produced
    ``x``, ``haillm.fp8.fused``), used instead of quantizing ``x`` here; the gradient still flows to ``x``.
    ``defer_wgrad`` (``haillm.ops.wgrad.defer_weight_grad``) may take the Wgrad GEMM out of backward, to run
    later from the saved FP8 tensors (zero-bubble W); ``wgrad`` picks its numerics ("bf16" or "fp8", see the
    module doc). Any shape works through the reference GEMM on CPU and cuBLAS's on an SM90 GPU, zero-padded
    where it wants whole blocks (``gemm_plan``); ``weight_padded`` (``Fp8WeightCache.padded()``, with
    ``weight_q`` from the same cache) is the weight already padded so, which Fprop and Dgrad then read
    instead of padding it on every call."""
    w_q, w_s, *w_t = weight_q if weight_q is not None else weight_quant(weight.detach(), pow2=pow2)
    check_wgrad_mode(wgrad)
    if x_fp8 is not None and x_fp8[0].shape != x.shape:
        raise ValueError(f"x_fp8 must quantize x: shapes {tuple(x_fp8[0].shape)} and {tuple(x.shape)} differ")
    return Fp8LinearFunction.apply(x, weight, w_q, w_s, tuple(w_t) or None, pow2, defer_wgrad, wgrad, x_fp8,
                                   weight_padded)


class Fp8WeightCache:
    """The FP8 copy of one weight, requantized only when the weight changed: once per optimizer step, then
    reused by every micro-batch. With ``transposed`` it also keeps the transposed copy Dgrad reads
    (``weight_quant_with_t``, one pass over the weight on the GPU) instead of transposing per micro-batch.
    Change is detected through ``weight._version`` (bumped by in-place
    updates such as ``optimizer.step()``) and the storage pointer; writes through ``weight.data`` are not
    seen by ``_version``, so code that updates weights that way must call ``invalidate()``."""

    def __init__(self, weight: torch.Tensor, pow2: bool = False, transposed: bool = False):
        self.weight, self.pow2, self.transposed = weight, pow2, transposed
        self._key: tuple[int, int] | None = None
        self._value: tuple[torch.Tensor, ...] | None = None
        self._padded: tuple[torch.Tensor, ...] | None = None  # padded(), made from _value when first asked

    def invalidate(self) -> None:
        self._key = None

    def get(self) -> tuple[torch.Tensor, ...]:
        """``(q, s)``, or ``(q, s, q.T, s.T)`` with ``transposed``."""
        key = (self.weight._version, self.weight.data_ptr())
        if key != self._key or self._value is None:
            quantize = weight_quant_with_t if self.transposed else weight_quant
            self._value = quantize(self.weight.detach(), pow2=self.pow2)
            self._padded = None
            self._key = key
        return self._value

    def padded(self) -> tuple[torch.Tensor, ...] | None:
        """``get()``'s FP8 weight zero-padded as cuBLAS's ``scaled_mm`` takes it (``padded_weight``; with
        ``transposed``, the transposed copy too): ``(q, s)`` or ``(q, s, q.T, s.T)`` padded, made once per
        quantization instead of on every GEMM; None where ``fp8_gemm`` does not pad this weight (the CPU's
        reference GEMM, widths of whole 128-blocks). For ``fp8_linear``'s ``weight_padded``; a 2-D weight."""
        value = self.get()
        if self._padded is None:
            fprop = padded_weight(value[0], value[1]) if value[0].dim() == 2 else None
            if fprop is None:
                self._padded = ()
            else:
                self._padded = fprop + (padded_weight(value[2], value[3]) if self.transposed else ())
        return self._padded or None
