"""The one linear op of the model.

Kept deliberately small: a weight of shape ``[out_features, in_features]`` (the ``F.linear`` / Hugging Face
layout), no bias by default, forward through ``F.linear``. FP8, tensor parallelism and deferred weight
gradients extend this class instead of touching model code.

Precision is a per-module switch (``set_precision``), normally flipped for a whole model by
``haillm.fp8.policy.apply_fp8``:

- ``"default"``: ``F.linear`` in the tensors' own dtype (bitwise the plain op).
- ``"fp8"``: DeepSeek-V3's FP8 linear (``haillm.fp8.fp8_linear``: FP8 Fprop and Dgrad, Wgrad in BF16 or
  FP8 (``fp8_wgrad``), input cached in FP8). The weight is quantized once and reused until it changes
  (``Fp8WeightCache``); an optimizer that writes parameters without bumping their version (ZeRO-1's
  in-place gather) must be followed by ``invalidate_fp8_weight()``. Nothing FP8 is a parameter or buffer:
  checkpoints keep the master weights.
- ``"bf16_emulated"``: the numerics of a BF16 GEMM on a CPU without fast bf16 matmul: every GEMM operand
  is rounded to bf16, the arithmetic is fp32. The baseline of the FP8 fidelity benchmark.

Weight-gradient deferral (zero-bubble I/W, ``haillm.ops.wgrad``) is a second per-module switch,
``defer_wgrad`` (``set_weight_grad_deferral`` flips it for a whole model): the ``"default"`` path then runs
``deferrable_linear``, bitwise ``F.linear`` unless a backward runs inside ``deferring_weight_grads``. It is
off by default because the custom autograd function costs ~20 us per call on CPU (~10% of a tiny-model
step), which only pays where a pipeline schedule uses I/W. The FP8 path defers its Wgrad GEMM the same
way; the bf16-emulated path (a benchmark baseline) does not defer.

``Linear.cross_entropy_sum`` is the output head's training loss, fused on the plain path
(``LinearCrossEntropySum``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from haillm.fp8 import Fp8WeightCache, fp8_linear
from haillm.fp8.linear import check_wgrad_mode
from haillm.fp8.quant import Fp8Pair
from haillm.ops import precision
from haillm.ops.precision import apply_like_autocast, autocast_off
from haillm.ops.wgrad import defer_weight_grad, deferrable_linear

PRECISIONS = ("default", "fp8", "bf16_emulated")
# fp32 logits per row block of LinearCrossEntropySum, on CPU and on accelerators. The kept exponentials of
# all blocks add up to the same [tokens, vocab] either way; the block bounds the temporaries and sets the
# GEMM count. On CPU a fresh block is page-faulted in (small is fast); on a GPU every block costs a round of
# kernel launches and small GEMMs waste the tensor cores.
CE_BLOCK_BYTES = 16 << 20
CE_BLOCK_BYTES_GPU = 512 << 20


class Bf16EmulatedLinear(torch.autograd.Function):
    """``x @ W.T`` with the operands of all three GEMMs rounded to bf16 (x, W in Fprop; dy, W in Dgrad;
    dy, x in Wgrad) and fp32 arithmetic. Inputs are saved in bf16, as a BF16 run caches them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return F.linear(xb.float(), wb.float()).to(x.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor):
        xb, wb = ctx.saved_tensors
        dyb = dy.to(torch.bfloat16).float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dyb @ wb.float()).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = (dyb.reshape(-1, dy.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1]).float()).to(ctx.w_dtype)
        return dx, dw


class LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(x_i W^T, t_i)`` computed one block of rows at a time (logits from a GEMM in the operands'
    dtype, softmax and loss in fp32 or wider); no ``ignore_index`` (every target must be a valid class).

    Each block's logits are exponentiated in place (after subtracting the row max) and are the only
    ``[rows, vocab]`` tensor kept; backward turns them, again in place, into the logit gradient
    ``grad * (softmax - onehot)`` and feeds it straight to the two GEMMs. ``F.cross_entropy(F.linear(x, W))``
    instead writes the logits, the log-probabilities, a zeroed one-hot gradient and the log-softmax
    gradient: four vocab-wide tensors, each a fresh allocation that the CPU page-faults in (a 32 MB one
    costs ~14 ms here, more than the arithmetic). Because backward consumes what it kept, a second
    backward through the same graph fails autograd's saved-tensor check (no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        budget = CE_BLOCK_BYTES if x.device.type == "cpu" else CE_BLOCK_BYTES_GPU
        rows = max(64, budget // (4 * weight.shape[0]))
        dtype = torch.promote_types(x.dtype, torch.float32)
        loss = torch.zeros((), dtype=dtype, device=x.device)
        exps, totals = [], []
        for start in range(0, x.shape[0], rows):
            logits = precision.linear(x[start : start + rows], weight).to(dtype)
            picked = logits.gather(1, targets[start : start + rows, None])
            peak = logits.amax(dim=1, keepdim=True)
            exps.append(logits.sub_(peak).exp_())
            totals.append(exps[-1].sum(dim=1, keepdim=True))
            loss += (peak + totals[-1].log() - picked).sum()
        ctx.rows = rows
        ctx.save_for_backward(x, weight, targets, *exps, *totals)
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, targets, *kept = ctx.saved_tensors
        n_blocks = len(kept) // 2
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if ctx.needs_input_grad[0] else None
        dw = None  # summed over blocks in fp32 (or wider), rounded to the weight's dtype once
        for i, (exp, total) in enumerate(zip(kept[:n_blocks], kept[n_blocks:], strict=True)):
            block = slice(i * ctx.rows, i * ctx.rows + exp.shape[0])
            dlogits = exp.mul_(grad / total)
            dlogits.scatter_add_(1, targets[block, None], (-grad).expand(exp.shape[0], 1))
            dlogits = dlogits.to(x.dtype)
            if dx is not None:
                precision.mm(dlogits, weight, out=dx[block])
            if ctx.needs_input_grad[1]:
                part = precision.matmul(dlogits.t(), x[block])
                dw = part.to(exp.dtype) if dw is None else dw.add_(part)
        return dx, None if dw is None else dw.to(weight.dtype), None


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)``. Weights start uninitialised; the model's ``init_weights`` fills them."""

    forward_methods = ("cross_entropy_sum",)  # reads the weight outside __call__ (ZeroAdamW.register_forward_wait)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.precision = "default"
        self.fp8_pow2_scales = False
        self.fp8_wgrad = "bf16"
        self._fp8_weight: Fp8WeightCache | None = None
        self.defer_wgrad = False

    def set_precision(self, precision: str, pow2_scales: bool = False, wgrad: str = "bf16") -> None:
        """Switch the GEMM numerics (see the module doc); ``pow2_scales`` and ``wgrad`` (the weight-gradient
        GEMM's mode, ``fp8.linear``) apply to ``"fp8"`` only."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_wgrad_mode(wgrad)
        self.precision, self.fp8_pow2_scales, self.fp8_wgrad = precision, pow2_scales, wgrad
        self._fp8_weight = None

    def invalidate_fp8_weight(self) -> None:
        """Forget the cached FP8 weight: call after the weight changed behind autograd's version counter."""
        if self._fp8_weight is not None:
            self._fp8_weight.invalidate()

    def _fp8_forward(self, x: torch.Tensor, x_fp8: Fp8Pair | None) -> torch.Tensor:
        cache = self._fp8_weight
        if cache is None or cache.weight is not self.weight:  # built lazily; rebuilt if the Parameter was swapped
            cache = self._fp8_weight = Fp8WeightCache(self.weight, pow2=self.fp8_pow2_scales, transposed=True)
        defer = defer_weight_grad if self.defer_wgrad else None
        return fp8_linear(x, self.weight, weight_q=cache.get(), pow2=self.fp8_pow2_scales, defer_wgrad=defer,
                          wgrad=self.fp8_wgrad, x_fp8=x_fp8)

    def forward(self, x: torch.Tensor, x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        """``x_fp8``: ``act_quant(x, pow2=self.fp8_pow2_scales)`` made by x's producer (``haillm.fp8.fused``),
        used in precision "fp8" instead of quantizing ``x`` again; the other precisions ignore it."""
        if self.precision == "default":
            if self.defer_wgrad:
                return deferrable_linear(x, self.weight, self.bias)
            return precision.linear(x, self.weight, self.bias)
        if self.precision == "fp8":
            y = self._fp8_forward(x, x_fp8)
        else:
            y = apply_like_autocast(Bf16EmulatedLinear, x, self.weight)
        return y if self.bias is None else y + self.bias

    @property
    def is_plain(self) -> bool:
        """True when ``forward`` is exactly ``F.linear(x, self.weight)``, so fused paths may use the weight."""
        return self.precision == "default" and not self.defer_wgrad and self.bias is None

    def cross_entropy_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``F.cross_entropy(self(x).float(), targets, reduction="sum")`` over all leading dims; fused
        (``LinearCrossEntropySum``) on the plain path, the module's own forward otherwise."""
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if self.is_plain:
            return apply_like_autocast(LinearCrossEntropySum, x, self.weight, targets)
        return F.cross_entropy(self(x).float(), targets, reduction="sum")

    def extra_repr(self) -> str:
        extra = "" if self.precision == "default" else f", precision={self.precision}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{extra}"


def set_weight_grad_deferral(module: nn.Module, enabled: bool = True) -> None:
    """Turn weight-gradient deferral on or off for every ``Linear`` in ``module``."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.defer_wgrad = enabled
