"""FP8 quantization fused into the ops that produce FP8 linears' inputs (DeepSeek-V3 report §3.3: the 1x128
activation quantization is fused into the preceding operator).

- ``rmsnorm_act_quant(x, weight, eps, pow2) -> (y, y_q, y_s)``: ``y = RMSNorm(x)`` exactly as
  ``haillm.ops.norm.RMSNorm`` computes it and ``(y_q, y_s) = act_quant(y, pow2=pow2)``. In the model the
  attention norm feeds ``wq_a``/``wkv_a`` (or ``wq``) and the FFN norm feeds ``w1``/``w3``: quantized once
  here, every FP8 consumer takes the same pair (``Linear.forward(x, x_fp8)``) instead of quantizing ``y``
  again itself.
- ``swiglu_act_quant(a, b, pow2) -> (h, h_q, h_s)``: ``h = F.silu(a) * b`` in the inputs' dtype and its FP8
  copy, the input of the FP8 down projection ``w2``.

``y``/``h`` carry the gradient (to ``x`` and ``weight``, resp. ``a`` and ``b``); the FP8 pair carries none.
Both ops are autograd Functions whose forward is one Triton kernel on a CUDA tensor (``haillm.fp8.triton_fused``,
reading the input once and writing the output and its FP8 copy; ``kernel_applies`` is the rule) and the torch
composition everywhere else, and whose backward is the same on every device:
- RMSNorm's own (``haillm.ops.norm.rms_norm_backward``), from the same saved ``x, rstd, weight``.
- SwiGLU's: bitwise the gradients autograd gives ``F.silu(a) * b``, from ``a`` and ``b`` only: ``silu(a)`` is
  recomputed in backward instead of kept (the report caches the SwiGLU inputs and recomputes its output).

On the torch path the outputs are bitwise those of the unfused ops (``RMSNorm`` or ``F.silu(a) * b``, then
``act_quant``). The kernels compute ``y``/``h`` in fp32 like torch, in another summation order (RMSNorm's
mean of squares) and with libdevice's ``exp``, so ``y``/``h`` are within the output dtype's rounding of
torch's (tests/test_fp8_fused.py states the bounds); the FP8 pair is then bitwise ``act_quant`` of the
kernel's own ``y``/``h`` as stored (the rounded values, not the fp32 ones).

``fp8_input_pow2`` is the model's rule for when a producer quantizes: when at least one of its consumers is
an FP8 linear; ``fusion(False)`` switches that off for comparisons (the path before fusion). ``normed`` is how
the model applies an RMSNorm module under that rule, wherever a norm feeds linears: the block's attention and
FFN norms, MLA's ``q_norm`` and ``kv_norm``, the MTP module's ``enorm`` and ``hnorm``.
"""

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from haillm.fp8.quant import FP8_DTYPE, Fp8Pair, act_quant, quant_kernel_applies
from haillm.ops.graph_breaks import eager_in_compiled_regions
from haillm.ops.linear import Linear
from haillm.ops.norm import RMSNorm, rms_norm_backward, rms_norm_with_rstd
from haillm.ops.recompute import mark_outputs

RMSNORM_KERNEL_MAX_WIDTH = 16384  # the norm kernel holds whole rows in registers; wider rows take the torch path
_fusion_on = True


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Within the block, producers quantize for their FP8 consumers (``enabled``, the default) or leave it to
    each FP8 linear (the unfused path, to compare against)."""
    global _fusion_on
    before, _fusion_on = _fusion_on, enabled
    try:
        yield
    finally:
        _fusion_on = before


def fp8_input_pow2(linears: Iterable[Linear]) -> bool | None:
    """The ``pow2`` setting of the FP8 copy that the "fp8" linears among ``linears``, all reading one tensor,
    can share; None when there is none (or they disagree, or fusion is off): then nobody quantizes ahead."""
    settings = {m.fp8_pow2_scales for m in linears if m.precision == "fp8"}
    return settings.pop() if _fusion_on and len(settings) == 1 else None


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the fused ops run their Triton kernel on ``x``: a float32/bf16/fp16 tensor that ``act_quant``'s
    kernels would take (``quant_kernel_applies``: non-empty, CUDA, SM89+, Triton installed)."""
    return x.dtype != FP8_DTYPE and quant_kernel_applies(x)


def _rmsnorm_act_quant_torch(x, weight, eps, pow2):
    y, rstd = rms_norm_with_rstd(x, weight, eps)
    return y, rstd, *act_quant(y, pow2=pow2)


def _swiglu_act_quant_torch(a, b, pow2):
    h = F.silu(a) * b
    return h, *act_quant(h, pow2=pow2)


class _RMSNormActQuant(torch.autograd.Function):
    """RMSNorm whose forward also returns the FP8 copy of its output; backward is RMSNorm's."""

    @staticmethod
    def forward(ctx, x, weight, eps, pow2, kernel):
        if kernel:
            from haillm.fp8 import triton_fused

            y, rstd, y_q, y_s = triton_fused.rmsnorm_act_quant(x, weight, eps, pow2)
        else:
            y, rstd, y_q, y_s = _rmsnorm_act_quant_torch(x, weight, eps, pow2)
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(y_q, y_s)
        ctx.set_materialize_grads(False)
        return y, y_q, y_s

    @staticmethod
    def backward(ctx, dy, _dq, _ds):
        return *rms_norm_backward(dy, *ctx.saved_tensors, *ctx.needs_input_grad[:2]), None, None, None


def swiglu_grads(dh: torch.Tensor, a: torch.Tensor, b: torch.Tensor, needed: tuple[bool, bool],
                 silu_a: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``F.silu(a) * b`` to ``a`` and ``b`` (each where ``needed``) from ``a`` and ``b`` only,
    bitwise what autograd runs: MulBackward (``dh * b``, ``dh * silu(a)``), then SiluBackward. ``silu_a``:
    ``F.silu(a)`` when the caller has it."""
    da = torch.ops.aten.silu_backward(dh * b, a) if needed[0] else None
    db = dh * (F.silu(a) if silu_a is None else silu_a) if needed[1] else None
    return da, db


class _SwiGLUActQuant(torch.autograd.Function):
    """``F.silu(a) * b`` whose forward also returns the FP8 copy of its output; keeps only ``a`` and ``b``."""

    @staticmethod
    def forward(ctx, a, b, pow2, kernel):
        if kernel:
            from haillm.fp8 import triton_fused

            h, h_q, h_s = triton_fused.swiglu_act_quant(a, b, pow2)
        else:
            h, h_q, h_s = _swiglu_act_quant_torch(a, b, pow2)
        ctx.save_for_backward(a, b)
        ctx.mark_non_differentiable(h_q, h_s)
        ctx.set_materialize_grads(False)
        return h, h_q, h_s

    @staticmethod
    def backward(ctx, dh, _dq, _ds):
        return *swiglu_grads(dh, *ctx.saved_tensors, ctx.needs_input_grad[:2]), None, None


# Inside a compiled region (haillm.train.compile) the fused ops run eagerly at a graph break, like the FP8
# linears they feed: traced, their non-differentiable FP8 outputs failed AOTAutograd on torch 2.11 (the GPU
# machine's), and on CUDA their forward is a Triton kernel of its own anyway.
@eager_in_compiled_regions
def rmsnorm_act_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = RMSNorm(x)`` (``haillm.ops.norm``, differentiable) and ``act_quant(y, pow2=pow2)``: one kernel on
    the GPU."""
    kernel = kernel_applies(x) and x.shape[-1] <= RMSNORM_KERNEL_MAX_WIDTH
    return _RMSNormActQuant.apply(x, weight, eps, pow2, kernel)


@eager_in_compiled_regions  # see rmsnorm_act_quant
def swiglu_act_quant(a: torch.Tensor, b: torch.Tensor, pow2: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = F.silu(a) * b`` (differentiable) and ``act_quant(h, pow2=pow2)`` of two tensors of one shape: one
    kernel on the GPU."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu_act_quant takes two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    kernel = kernel_applies(a) and a.dtype == b.dtype and b.is_cuda
    return _SwiGLUActQuant.apply(a, b, pow2, kernel)


def _fused_norm_outputs(x: torch.Tensor, norm: RMSNorm, pow2: bool) -> tuple[torch.Tensor, ...]:
    return rmsnorm_act_quant(x, norm.weight, norm.eps, pow2)


def normed(norm: RMSNorm, x: torch.Tensor, pow2: bool | None) -> tuple[torch.Tensor, Fp8Pair | None]:
    """``norm(x)`` and, when its consumers take an FP8 input (``pow2``: their ``fp8_input_pow2``, not None),
    ``act_quant(norm(x))`` from the same pass (``rmsnorm_act_quant``). The fused output is marked for
    recomputation like the plain one (the model's ``set_recompute`` hooks the norm modules, which the fused
    path does not call), and so is the FP8 copy: recomputed, as deterministic, bitwise what was not kept. The
    marks are unused while recompute is off."""
    if pow2 is None:
        return norm(x), None
    y, y_q, y_s = norm.forward_fp8(x, pow2)
    if torch.is_grad_enabled():
        mark_outputs((y, y_q, y_s), _fused_norm_outputs, x, norm, pow2)
    return y, (y_q, y_s)
