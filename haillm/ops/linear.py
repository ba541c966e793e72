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

``Linear.cross_entropy_sum`` is the output head's training loss, fused in the default precision
(``LinearCrossEntropySum``: it keeps nothing vocabulary-wide per token for backward, and defers its weight
gradient like ``deferrable_linear``).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from haillm.fp8 import Fp8WeightCache, fp8_linear
from haillm.fp8.linear import check_wgrad_mode
from haillm.fp8.quant import Fp8Pair
from haillm.ops import precision
from haillm.ops.precision import apply_like_autocast, autocast_off
from haillm.ops.wgrad import defer_weight_grad, deferrable_linear
from haillm.parallel.tensor import NO_TP

PRECISIONS = ("default", "fp8", "bf16_emulated")
# fp32 logits per row block of LinearCrossEntropySum: the bound on its vocabulary-wide temporaries (nothing
# vocabulary-wide is kept between forward and backward), one per device kind, never a measurement. On CPU a
# fresh block is page-faulted in (small is fast); on a GPU every block costs a round of kernel launches and
# small GEMMs waste the tensor cores. The block also fixes the order of the weight gradient's fp32 sum.
CE_BLOCK_BYTES = 16 << 20
CE_BLOCK_BYTES_GPU = 512 << 20
# LinearCrossEntropySum computes its gradients in forward, keeping the fp32 weight gradient until backward,
# when that gradient comes to at most this many bytes per token of the call (ce_grads_in_forward); else it
# keeps O(dim) per token and recomputes the logits in backward. A memory bound, the same on every device:
# DeepSeek-V3's head (vocab 129,280 x dim 7,168) recomputes below 226K tokens per call, and at or above it
# keeps 16 KB plus the 14 KB BF16 input gradient per token, under 32 KB either way. The CPU presets' heads
# (small: 8,192 x 384 on 1,024 tokens, 12 KB per token) compute in forward, and so do without the
# recomputation's fourth head GEMM (+5-10% of a step of small on CPU).
CE_WGRAD_BYTES_PER_TOKEN = 16 << 10


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


def ce_grads_in_forward(vocab: int, dim: int, tokens: int) -> bool:
    """Whether ``LinearCrossEntropySum`` on ``tokens`` rows computes its gradients in forward: when its one
    fp32 weight gradient (``vocab x dim``) comes to at most ``CE_WGRAD_BYTES_PER_TOKEN`` per token. Depends
    on the shapes only, the same on every device (``haillm.tools.activations`` models it)."""
    return 4 * vocab * dim <= CE_WGRAD_BYTES_PER_TOKEN * tokens


def _ce_block_rows(vocab: int, device: torch.device) -> int:
    """Rows per block of ``LinearCrossEntropySum``: as many as keep one block's fp32 logits within the
    device kind's budget (``CE_BLOCK_BYTES``, ``CE_BLOCK_BYTES_GPU``), at least 64."""
    budget = CE_BLOCK_BYTES if device.type == "cpu" else CE_BLOCK_BYTES_GPU
    return max(64, budget // (4 * vocab))


def _ce_block_grads(probs: torch.Tensor, at_target: torch.Tensor, targets: torch.Tensor, x: torch.Tensor,
                    w: torch.Tensor, dx: torch.Tensor | None, dw: torch.Tensor | None, want_w: bool
                    ) -> torch.Tensor | None:
    """One row block's gradients from its scaled softmax ``probs`` (fp32 or wider, overwritten): ``at_target``
    (minus the scale: 0-dim, or ``[rows, 1]`` with 0 where a row's target is another rank's class) added at
    each row's target, the result rounded to the GEMM dtype and fed to the Dgrad GEMM (into ``dx``, if given)
    and, if ``want_w``, to the Wgrad GEMM, added to the fp32 (or wider) sum ``dw`` (None: the first block);
    returns the sum."""
    probs.scatter_add_(1, targets[:, None], at_target.expand(probs.shape[0], 1))
    dlogits = probs.to(x.dtype)
    if dx is not None:
        precision.mm(dlogits, w, out=dx)
    if not want_w:
        return dw
    part = precision.matmul(dlogits.t(), x)
    return part.to(probs.dtype) if dw is None else dw.add_(part)


@dataclass(frozen=True)
class VocabShard:
    """The classes ``start .. start + rows - 1`` of a vocabulary split over a tensor-parallel ``group``: the
    head's weight rows this rank holds (``LinearCrossEntropySum``'s vocabulary-parallel form)."""

    start: int
    group: dist.ProcessGroup

    def local_targets(self, targets: torch.Tensor, rows: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets - start, 0 where outside)`` and ``[n, 1]`` ones where the target is one of ours."""
        mine = (targets >= self.start) & (targets < self.start + rows)
        return (targets - self.start).masked_fill(~mine, 0), mine.to(dtype)[:, None]

    def peak_(self, peak: torch.Tensor) -> None:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)

    def sums(self, total: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([total, picked], dim=1)
        dist.all_reduce(both, group=self.group)
        return both[:, :1], both[:, 1:]


class LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(x_i W^T, t_i)`` computed one block of rows at a time (logits from a GEMM in the operands'
    dtype, softmax and loss in fp32 or wider); no ``ignore_index`` (every target must be a valid class).
    ``apply(x, weight, targets, defer=False, grads_in_forward=None)``.

    Nothing ``[tokens, vocab]`` is kept for backward. Two ways, chosen by ``ce_grads_in_forward`` from the
    shapes (``grads_in_forward=None``) or by the caller:

    - Recompute (large vocab x dim for the tokens: DeepSeek-V3's head): forward keeps the GEMM input ``x``
      (in the GEMM's dtype), the targets, and per row the logits' max and the sum of their exponentials (two
      fp32 numbers): O(dim) per token, for DeepSeek-V3 in BF16 14,336 + 8 bytes and the int64 target, where
      keeping the exponentiated logits took 4 x 129,280 more. Backward computes each block's logits again
      (the forward's GEMM on the same operands) and turns them in place into the logit gradient
      ``exp(logit - max) * (grad / sum)``, ``-grad`` added at the target: exactly the arithmetic of keeping
      them, so the same gradients, bitwise, wherever the GEMM is deterministic. One more head GEMM: four.
    - Gradients in forward (small vocab x dim for the tokens: the CPU presets): forward goes on from each
      block's exponentials to the logit gradient for a loss gradient of 1 (``exp(logit - max) * (1 / sum)``,
      ``-1`` at the target) and through both GEMMs at once, and keeps the input gradient (``[tokens, dim]``
      in the GEMM dtype) and the weight gradient summed in fp32 (``[vocab, dim]``, at most
      ``CE_WGRAD_BYTES_PER_TOKEN`` per token); backward multiplies both, in place, by the loss gradient,
      known only then (so a second backward through the graph fails autograd's saved-tensor check, as it
      did when the kept logits were consumed). Three GEMMs, as when the logits are kept. The gradients are
      bitwise those of the other way for a loss gradient that is a power of two, and differ by rounding
      otherwise (the scale applied after the GEMMs instead of before: a few fp32 ulps of the largest
      entries; in BF16 the logit gradient is rounded unscaled and the input gradient twice).

    Vocabulary-parallel (``shard``, a ``VocabShard``): ``weight`` is this rank's block of classes; each row
    block's maximum and sums of exponentials and target logits are reduced over the shard's group (two small
    all-reduces per block, in forward only), and the input gradient is this rank's partial sum, for the
    tensor-parallel region's entry to add up.

    The weight gradient is summed over blocks in fp32 (or wider) and rounded once, to the GEMM dtype and then
    to the weight's (what ``F.linear`` under autocast gives an fp32 parameter). Autocast is handled here, as
    ``_DeferrableLinear`` does: the GEMMs run in its dtype, the weight is cast where it is used (no cast copy
    kept), and ``weight`` is the parameter itself. ``defer`` (``Linear.defer_wgrad``): a backward inside
    ``deferring_weight_grads`` returns the input gradient and queues the weight gradient. What the W phase
    holds is what forward kept: O(dim) per token when recomputing (W computes the logits once more: a fifth
    GEMM), or the weight gradient already computed, which W only scales and accumulates.

    ``F.cross_entropy(F.linear(x, W))`` instead writes the logits, the log-probabilities, a zeroed one-hot
    gradient and the log-softmax gradient, four vocab-wide tensors (on CPU each a fresh allocation that is
    page-faulted in), and keeps one of them for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, defer: bool = False,
                grads_in_forward: bool | None = None, shard: VocabShard | None = None) -> torch.Tensor:
        device, (vocab, dim) = x.device.type, weight.shape
        ctx.x_dtype, ctx.weight, ctx.defer = x.dtype, weight, defer  # the parameter itself: W accumulates there
        ctx.dtype = dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grads_in_forward is None:
            grads_in_forward = (want_x or want_w) and ce_grads_in_forward(vocab, dim, x.shape[0])
        ctx.grads_in_forward = grads_in_forward
        with torch.autocast(device, enabled=False):
            x, w = x.to(dtype), weight.to(dtype)
            ctx.rows = rows = _ce_block_rows(vocab, x.device)
            acc = torch.promote_types(dtype, torch.float32)
            loss = torch.zeros((), dtype=acc, device=x.device)
            minus_one = torch.full((), -1.0, dtype=acc, device=x.device)
            mine = None  # [n, 1]: 1 where the target is one of this rank's classes (vocabulary-parallel)
            if shard is not None:
                targets, mine = shard.local_targets(targets, vocab, acc)
            dx = torch.empty(x.shape, dtype=dtype, device=x.device) if grads_in_forward and want_x else None
            dw, peaks, totals = None, [], []
            for start in range(0, x.shape[0], rows):
                block = slice(start, start + rows)
                logits = precision.linear(x[block], w).to(acc)
                picked = logits.gather(1, targets[block, None])
                peak = logits.amax(dim=1, keepdim=True)
                if shard is not None:
                    picked = picked * mine[block]
                    shard.peak_(peak)
                total = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
                if shard is not None:
                    total, picked = shard.sums(total, picked)
                loss += (peak + total.log() - picked).sum()
                if grads_in_forward:
                    at_target = minus_one if mine is None else minus_one * mine[block]
                    dw = _ce_block_grads(logits.mul_(1 / total), at_target, targets[block], x[block], w,
                                         None if dx is None else dx[block], dw, want_w)
                else:
                    peaks.append(peak)
                    totals.append(total)
        if grads_in_forward:
            ctx.save_for_backward(dx, dw)
        else:
            peak, total = (torch.cat(t) if len(t) > 1 else t[0] for t in (peaks, totals))
            ctx.save_for_backward(x, targets, peak, total, mine)
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        # locals only: a queued weight gradient must not hold on to the graph node
        weight, dtype, rows, in_forward = ctx.weight, ctx.dtype, ctx.rows, ctx.grads_in_forward
        saved = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        def recomputed(dx: torch.Tensor | None, want_w: bool) -> torch.Tensor | None:
            """The recompute way's pass over the blocks: Dgrad into ``dx``, the Wgrad sum if ``want_w``."""
            x, targets, peak, total, mine = saved
            w, dw = weight.to(dtype), None
            for start in range(0, x.shape[0], rows):
                block = slice(start, start + rows)
                logits = precision.linear(x[block], w).to(peak.dtype)
                probs = logits.sub_(peak[block]).exp_().mul_(grad / total[block])
                at_target = -grad if mine is None else -grad * mine[block]
                dw = _ce_block_grads(probs, at_target, targets[block], x[block], w,
                                     None if dx is None else dx[block], dw, want_w)
            return dw

        def weight_grad() -> torch.Tensor:
            # in place: a second backward through the graph fails autograd's saved-tensor version check
            dw = saved[1].mul_(grad) if in_forward else recomputed(None, True)
            return dw.to(dtype).to(weight.dtype)

        if want_w and ctx.defer and defer_weight_grad(weight, weight_grad):
            want_w = False  # queued for the W phase
        dx = dw = None
        if in_forward:
            dx = saved[0].mul_(grad) if want_x else None
            dw = weight_grad() if want_w else None
        elif want_x or want_w:
            dx = torch.empty(saved[0].shape, dtype=dtype, device=grad.device) if want_x else None
            dw = recomputed(dx, want_w)
            dw = None if dw is None else dw.to(dtype).to(weight.dtype)
        return None if dx is None else dx.to(ctx.x_dtype), dw, None, None, None, None


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
        self.fp8_cache_transposed = False
        self._fp8_weight: Fp8WeightCache | None = None
        self.defer_wgrad = False
        # a vocabulary-parallel output head (haillm.parallel.tensor_plan): its rows are these classes of the
        # vocabulary, and cross_entropy_sum takes its input into the tensor-parallel region `tp` itself
        self.vocab_shard: VocabShard | None = None
        self.tp = NO_TP

    def set_precision(self, precision: str, pow2_scales: bool = False, wgrad: str = "bf16",
                      cache_transposed: bool = False) -> None:
        """Switch the GEMM numerics (see the module doc); ``pow2_scales``, ``wgrad`` (the weight-gradient
        GEMM's mode, ``fp8.linear``) and ``cache_transposed`` (``Fp8WeightCache``) apply to ``"fp8"`` only."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_wgrad_mode(wgrad)
        self.precision, self.fp8_pow2_scales, self.fp8_wgrad = precision, pow2_scales, wgrad
        self.fp8_cache_transposed = cache_transposed
        self._fp8_weight = None

    def invalidate_fp8_weight(self) -> None:
        """Forget the cached FP8 weight: call after the weight changed behind autograd's version counter."""
        if self._fp8_weight is not None:
            self._fp8_weight.invalidate()

    def _fp8_forward(self, x: torch.Tensor, x_fp8: Fp8Pair | None) -> torch.Tensor:
        cache = self._fp8_weight
        if cache is None or cache.weight is not self.weight:  # built lazily; rebuilt if the Parameter was swapped
            cache = self._fp8_weight = Fp8WeightCache(self.weight, pow2=self.fp8_pow2_scales,
                                                      transposed=self.fp8_cache_transposed)
        defer = defer_weight_grad if self.defer_wgrad else None
        return fp8_linear(x, self.weight, weight_q=cache.get(), pow2=self.fp8_pow2_scales, defer_wgrad=defer,
                          wgrad=self.fp8_wgrad, x_fp8=x_fp8, weight_padded=cache.padded())

    def forward(self, x: torch.Tensor, x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        """``x_fp8``: ``act_quant(x, pow2=self.fp8_pow2_scales)`` made by x's producer (``haillm.fp8.fused``),
        used in precision "fp8" instead of quantizing ``x`` again; the other precisions ignore it."""
        if self.vocab_shard is not None:
            raise RuntimeError("a vocabulary-parallel head holds a block of the classes and gives no whole logits: "
                               "train with cross_entropy_sum, or load the checkpoint at parallel.tp=1 for logits")
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
        (``LinearCrossEntropySum``: nothing vocabulary-wide kept per token, weight-gradient deferral with
        ``defer_wgrad``) in the default precision without bias (the output head, which the MTP modules share:
        FP8 keeps it in high precision, ``fp8.policy``), the module's own forward otherwise.

        A vocabulary-parallel head (``vocab_shard``) takes ``x: [B, T', dim]`` as a sequence shard
        (``T' * tp = T``, gathered into the region) or whole (``T' = T``), and never holds the whole logits."""
        if self.vocab_shard is not None:
            sharded = x.shape[:-1].numel() * self.tp.size == targets.numel()
            x = self.tp.enter(x, x.dim() - 2) if sharded else self.tp.replicated().enter(x)
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if self.precision == "default" and self.bias is None:
            grads_in_forward = None if torch.is_grad_enabled() else False  # no gradients computed in evaluation
            return LinearCrossEntropySum.apply(x, self.weight, targets, self.defer_wgrad, grads_in_forward,
                                               self.vocab_shard)
        if self.vocab_shard is not None:
            raise ValueError(f"a vocabulary-parallel head needs precision 'default' and no bias, not {self.precision}")
        return F.cross_entropy(self(x).float(), targets, reduction="sum")

    def extra_repr(self) -> str:
        extra = "" if self.precision == "default" else f", precision={self.precision}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{extra}"


def set_weight_grad_deferral(module: nn.Module, enabled: bool = True) -> None:
    """Turn weight-gradient deferral on or off for every ``Linear`` in ``module``."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.defer_wgrad = enabled
