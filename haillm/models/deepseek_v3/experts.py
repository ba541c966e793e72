"""The routed experts of one MoE layer as grouped GEMMs over weights stored stacked.

``GroupedExperts`` holds one parameter per projection for all the experts a rank owns: ``w1``/``w3``
``[E, inter, dim]`` and ``w2`` ``[E, dim, inter]``, row ``e`` being global expert ``ids[e]``. Their SwiGLU over
token rows sorted by expert is three grouped GEMMs (``torch._grouped_mm``) whose group offsets are a
cumulative sum on the device: no per-expert Python loop, no host synchronisation, no weight copies per step.
Experts that got no rows are empty groups; their weight gradient is zero.

Outside the module every expert keeps its global identity: ``state_dict()`` shows per-expert keys
``<gid>.w1.weight`` ... with per-expert shapes (views of the stacks, so DCP's in-place load and a Hugging
Face import write into them), ``load_state_dict`` stacks such keys back, ``per_expert_state`` names the
ZeRO-1 optimizer state the same way, and the model's ``init_weights`` seeds each row from its per-expert
FQN. A checkpoint therefore reads the same whichever ranks hold which experts.

GEMM numerics follow ``precision`` (set by the FP8 policy, as on ``ops.Linear``):

- ``"default"``: operands in the activation dtype (the autocast dtype under autocast); BF16 on CPU runs
  as fp32 arithmetic on bf16 operands (``ops.precision``). ``torch._grouped_mm`` serves CPU tensors and
  BF16 CUDA tensors whose base pointers and row strides are 16-byte multiples; anything else (fp32 on CUDA,
  odd widths, a misaligned view) falls back to one GEMM per expert over host-side offsets: correct, but it
  synchronises.
- ``"bf16_emulated"``: operands rounded to bf16, fp32 arithmetic (``ops.linear.Bf16EmulatedLinear``).
- ``"fp8"``: DeepSeek-V3's blockwise recipe (1x128 activation tiles, 128x128 weight blocks) as grouped GEMMs
  (``fp8.grouped.fp8_group_gemm``: a Triton kernel on SM90 that schedules its tiles on the device, the
  per-expert reference on CPU), with no host synchronisation: Fprop from one ``act_quant`` of all rows
  (1x128 tiles never cross rows, hence experts) and the quantized stack; Dgrad from ``act_quant(dy)`` and
  the transposed stack (square blocks transpose exactly), written by the same quantization pass: FP8
  tensor-core GEMMs read both operands K-major, so ``W[e].T`` is kept in that layout rather than read as a
  view of ``W`` (which SM90's kernel cannot copy ahead asynchronously; ``tests/test_triton_sm90.py``). Each
  stack is quantized per expert (``weight_quant_with_t`` of ``[E, out, in]``: no block straddles two experts,
  so any width works) once per optimizer step (``invalidate_fp8_weight`` after in-place updates). Only the
  FP8 ``x`` is kept for backward. The weight gradient has two modes (``set_precision(..., wgrad=...)``):

  - ``"bf16"`` (default): ``dy`` rounded to bf16 times the bf16 dequantization of the FP8 ``x``, through
    ``group_wgrad`` (fp32 accumulation; no host sync wherever ``torch._grouped_mm`` takes the widths, see
    above). On an H200 cuBLAS's FP8 Wgrad measured only 0.90-0.99x BF16, even pre-quantized.
  - ``"fp8"``: DeepSeek's FP8 Wgrad (``fp8.linear.fp8_wgrad``: 1x128 tiles along each expert's tokens) of
    every expert in one k-grouped GEMM (``fp8.grouped.fp8_group_wgrad``: the rows padded on the device so
    each expert starts a token tile, then a Triton kernel on SM90), with no host synchronisation either.

In every precision the weight gradient can be deferred (zero-bubble I/W): inside ``deferring_weight_grads``
backward computes the input gradient and queues one closure per stacked weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from haillm.fp8 import GRAD_AMAX_MIN, Fp8WeightCache, act_dequant, act_quant, fp8_group_gemm, fp8_group_wgrad
from haillm.fp8.fused import fp8_input_pow2, swiglu_act_quant
from haillm.fp8.linear import check_wgrad_mode
from haillm.fp8.quant import Fp8Pair
from haillm.models.deepseek_v3.swiglu import swiglu_keeping_inputs
from haillm.ops import precision
from haillm.ops.linear import PRECISIONS
from haillm.ops.wgrad import defer_weight_grad

WEIGHTS = ("w1", "w2", "w3")


# ---- grouped GEMMs ----------------------------------------------------------------------------------------


def _aligned(t: torch.Tensor, itemsize: int) -> bool:
    """``torch._grouped_mm``'s layout rule: one of the last two strides is 1, the other a 16-byte multiple."""
    (rows, cols), (s_rows, s_cols) = t.shape[-2:], t.stride()[-2:]
    if s_rows == 1 and s_cols >= max(1, rows):
        return s_cols * itemsize % 16 == 0
    if s_cols == 1 and s_rows >= max(1, cols):
        return s_rows * itemsize % 16 == 0
    return False


def _grouped_serves(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` (through ``ops.precision.grouped_mm``) takes these operands."""
    if a.device.type == "cpu":
        itemsize = 4 if precision.widens(a, b) else a.element_size()
    elif a.dtype == b.dtype == torch.bfloat16 and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0:
        itemsize = 2  # CUDA also wants 16-byte aligned base pointers (stacks are views into ZeRO buckets)
    else:
        return False
    return _aligned(a, itemsize) and _aligned(b, itemsize)


def _bounds(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` of every non-empty group, read on the host (a sync on a GPU)."""
    ends = offs.tolist()
    return [(g, s, e) for g, (s, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if e > s]


def group_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a[rows of g] @ b[g]`` for every group ``g``: ``a [rows, K]`` sorted by group, ``b [G, K, N]``,
    ``offs`` the int32 end row of each group (``offs[-1] == rows``)."""
    if a.shape[0] == 0:
        return a.new_zeros(0, b.shape[-1])
    if _grouped_serves(a, b):
        return precision.grouped_mm(a, b, offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    for g, s, e in _bounds(offs):
        precision.mm(a[s:e], b[g], out=out[s:e])
    return out


def group_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``dy[rows of g].T @ x[rows of g]`` for every group: ``[G, N, K]`` from ``dy [rows, N]``, ``x [rows, K]``;
    zero for empty groups."""
    shape = (offs.shape[0], dy.shape[1], x.shape[1])
    if x.shape[0] == 0:  # no contraction at all: the grouped kernel would leave its output unwritten
        return x.new_zeros(shape)
    if _grouped_serves(dy.t(), x):
        return precision.grouped_mm(dy.t(), x, offs)
    out = x.new_zeros(shape)
    for g, s, e in _bounds(offs):
        precision.mm(dy[s:e].t(), x[s:e], out=out[g])
    return out


# ---- one stacked linear -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Numerics:
    """How one grouped linear computes: ``precision``, the operand ``dtype`` of the default path, and for FP8
    the stack's cached ``(q [E, out, in], s [E, ⌈out/128⌉, ⌈in/128⌉], q.T, s.T)`` (``weight_quant_with_t``),
    the scale format and the Wgrad mode."""

    precision: str
    dtype: torch.dtype
    weight_q: tuple[torch.Tensor, ...] | None = None
    pow2: bool = False
    wgrad_mode: str = "bf16"

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16 if self.precision == "bf16_emulated" else self.dtype)

    def gemm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.precision == "bf16_emulated":
            a, b = a.float(), b.float()
        return group_mm(a, b, offs).to(out_dtype)

    def wgrad(self, dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.precision == "bf16_emulated":
            dy, x = dy.float(), x.float()
        return group_wgrad(dy, x, offs).to(out_dtype)


def _fp8_wgrad(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, offs: torch.Tensor, weight: torch.Tensor, num: _Numerics
) -> torch.Tensor:
    """``dW[g] = dy[rows of g].T @ x[rows of g]`` in the weight's dtype from the FP8 ``x`` saved in forward.

    ``"bf16"``: bf16 operands (``dy`` rounded, ``x`` dequantized) through ``group_wgrad``, fp32 accumulation,
    no host sync where ``torch._grouped_mm`` takes the widths. ``"fp8"``: DeepSeek-V3's recipe (``fp8_wgrad``:
    1x128 tiles along each expert's tokens) for all experts at once (``fp8_group_wgrad``), bitwise the
    per-expert ``fp8_wgrad`` on CPU and without a host sync on a GPU, at any width."""
    if num.wgrad_mode == "bf16":
        return group_wgrad(dy.to(torch.bfloat16), act_dequant(x_q, x_s, dtype=torch.bfloat16), offs).to(weight.dtype)
    return fp8_group_wgrad(dy, x_q, x_s, offs, num.pow2, weight.dtype)


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of g] = x[rows of g] @ weight[g].T`` with ``weight [G, out, in]`` a stacked parameter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, num: _Numerics,
                x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        # The parameter itself, not a saved copy: a deferred closure accumulates into it (see ops.wgrad).
        ctx.weight, ctx.num, ctx.x_dtype = weight, num, x.dtype
        with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen here, not by autocast
            if num.precision == "fp8":
                # 1x128 tiles lie in one row: one quantization for all experts (or the producer's, x_fp8)
                x_q, x_s = x_fp8 if x_fp8 is not None else act_quant(x, pow2=num.pow2)
                ctx.save_for_backward(x_q, x_s, offs)
                return fp8_group_gemm(x_q, x_s, *num.weight_q[:2], offs, x.dtype)
            a = num.operand(x)
            ctx.save_for_backward(a, offs)
            out_dtype = x.dtype if num.precision == "bf16_emulated" else a.dtype
            return num.gemm(a, num.operand(weight).transpose(1, 2), offs, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        weight, num = ctx.weight, ctx.num
        dy = dy.contiguous()
        if num.precision == "fp8":
            x_q, x_s, offs = ctx.saved_tensors
            dx = None
            if ctx.needs_input_grad[0]:
                # W.T's 128x128 blocks are W's transposed (no requantization), cached K-major with the stack.
                dy_q, dy_s = act_quant(dy, pow2=num.pow2, min_amax=GRAD_AMAX_MIN)
                w_t = num.weight_q[2:] or [t.transpose(-2, -1).contiguous() for t in num.weight_q[:2]]
                dx = fp8_group_gemm(dy_q, dy_s, *w_t, offs, ctx.x_dtype)

            def weight_grad() -> torch.Tensor:
                return _fp8_wgrad(dy, x_q, x_s, offs, weight, num)
        else:
            a, offs = ctx.saved_tensors
            g = num.operand(dy)
            dx = num.gemm(g, num.operand(weight), offs, ctx.x_dtype) if ctx.needs_input_grad[0] else None

            def weight_grad() -> torch.Tensor:
                return num.wgrad(g, a, offs, weight.dtype)

        dw = None
        if ctx.needs_input_grad[1] and not defer_weight_grad(weight, weight_grad):
            dw = weight_grad()
        return dx, dw, None, None, None


# ---- the module -------------------------------------------------------------------------------------------


class GroupedExperts(nn.Module):
    """SwiGLU experts ``w2(silu(w1 x) * w3 x)`` with stacked weights; row ``e`` is global expert ``ids[e]``
    (see the module docstring). ``self(x, counts)`` takes ``x [rows, dim]`` sorted by expert, ``counts[e]``
    rows for row ``e``."""

    def __init__(self, dim: int, inter_dim: int, expert_ids: Iterable[int]) -> None:
        super().__init__()
        self.ids = list(expert_ids)
        n = len(self.ids)
        self.w1 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.precision = "default"
        self.fp8_pow2_scales = False
        self.fp8_wgrad = "bf16"
        self.fp8_cache_transposed = False
        self._fp8: dict[str, Fp8WeightCache] = {}
        self.register_state_dict_post_hook(_per_expert_state_dict)
        self.register_load_state_dict_pre_hook(_stacked_state_dict)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """``probs``: each row's gate weight, applied to its SwiGLU output before ``w2``; backward then keeps
        only the SwiGLU's inputs (``swiglu.swiglu_keeping_inputs``)."""
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        pow2 = fp8_input_pow2([self])
        # FP8: w1 and w3 share one quantization of x (no gradient through it: the GEMM's is x's), and the
        # SwiGLU writes w2's FP8 input (fp8.fused)
        x_fp8 = None if pow2 is None else act_quant(x.detach(), pow2=pow2)
        a, b = self._linear(x, "w1", offs, x_fp8), self._linear(x, "w3", offs, x_fp8)
        if probs is not None:
            h, h_fp8 = swiglu_keeping_inputs(a, b, probs, pow2)
        elif pow2 is None:
            h, h_fp8 = F.silu(a) * b, None
        else:
            h, h_q, h_s = swiglu_act_quant(a, b, pow2)
            h_fp8 = (h_q, h_s)
        return self._linear(h, "w2", offs, h_fp8)

    def _linear(self, x: torch.Tensor, name: str, offs: torch.Tensor,
                x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight_q = self._fp8_weight(name) if self.precision == "fp8" else None
        num = _Numerics(self.precision, dtype, weight_q, self.fp8_pow2_scales, self.fp8_wgrad)
        return _GroupedLinear.apply(x, getattr(self, name), offs, num, x_fp8)

    # ---- precision (the FP8 policy's switch, as on ops.Linear) ----
    def set_precision(self, precision: str, pow2_scales: bool = False, wgrad: str = "bf16",
                      cache_transposed: bool = False) -> None:
        """``precision`` of the three GEMMs; in FP8 the scale format, the weight-gradient mode ``wgrad``:
        "bf16" (bf16 operands, the FP8 ``x`` dequantized) or "fp8" (DeepSeek-V3's FP8 Wgrad), and whether the
        transposed stacks Dgrad reads are cached between steps (``cache_transposed``) or made per backward."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_wgrad_mode(wgrad)
        self.precision, self.fp8_pow2_scales, self.fp8_wgrad = precision, pow2_scales, wgrad
        self.fp8_cache_transposed = cache_transposed
        self._fp8.clear()

    def invalidate_fp8_weight(self) -> None:
        """Forget the quantized stacks: call after the weights changed behind autograd's version counter."""
        for cache in self._fp8.values():
            cache.invalidate()

    def _fp8_weight(self, name: str) -> tuple[torch.Tensor, ...]:
        p = getattr(self, name)
        cache = self._fp8.get(name)
        if cache is None or cache.weight.data_ptr() != p.data_ptr():  # new, or the storage moved (ZeRO-1)
            # per expert, [E, out, in], with the transposed stack Dgrad reads
            cache = self._fp8[name] = Fp8WeightCache(p.detach(), self.fp8_pow2_scales,
                                                     transposed=self.fp8_cache_transposed)
        return cache.get()

    # ---- global expert identities ----
    def expert_pieces(self, name: str) -> list[tuple[str, int, torch.Size]]:
        """Stacked weight ``name`` as per-expert pieces: (state-dict suffix ``<gid>.<name>.weight``, element
        offset in the stack, shape)."""
        p = getattr(self, name)
        return [(f"{gid}.{name}.weight", e * p.shape[1:].numel(), p.shape[1:]) for e, gid in enumerate(self.ids)]

    def named_expert_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(<gid>.<w>.weight, view of the stack's row)`` in checkpoint order (expert by expert)."""
        for e, gid in enumerate(self.ids):
            for name in WEIGHTS:
                yield f"{gid}.{name}.weight", getattr(self, name)[e]

    def keep(self, expert_ids: Iterable[int]) -> None:
        """Hold only ``expert_ids`` (a subset of ``ids``; values kept, stacks copied): an expert-parallel rank's
        block, built on the meta device before any storage exists."""
        wanted = set(expert_ids)
        if not wanted <= set(self.ids):
            raise ValueError(f"experts {sorted(wanted - set(self.ids))} are not held here (held: {self.ids})")
        rows = [e for e, gid in enumerate(self.ids) if gid in wanted]
        index = torch.tensor(rows, dtype=torch.long, device=self.w1.device)
        for name in WEIGHTS:
            p = getattr(self, name)
            setattr(self, name, nn.Parameter(p.detach().index_select(0, index), requires_grad=p.requires_grad))
        self.ids = [self.ids[e] for e in rows]
        self._fp8.clear()

    def __getitem__(self, key: str) -> ExpertView:
        """Expert ``key`` (a global id, as in checkpoints) alone: a reference, gradients reach the stacks."""
        return ExpertView(self, self.ids.index(int(key)))

    def __delitem__(self, key: str) -> None:
        self.keep(gid for gid in self.ids if gid != int(key))

    def extra_repr(self) -> str:
        extra = "" if self.precision == "default" else f", precision={self.precision}"
        extra += f", wgrad={self.fp8_wgrad}" if self.precision == "fp8" else ""
        return f"experts={self.ids[0]}..{self.ids[-1]} ({len(self.ids)}){extra}" if self.ids else "experts=none"


@dataclass(frozen=True)
class ExpertView:
    """Row ``row`` of a ``GroupedExperts``: that expert's SwiGLU and weights (views of the stacks)."""

    experts: GroupedExperts
    row: int

    def parameters(self) -> Iterator[torch.Tensor]:
        return (getattr(self.experts, name)[self.row] for name in WEIGHTS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.parameters()
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _per_expert_state_dict(module: GroupedExperts, state: dict, prefix: str, local_metadata: dict) -> None:
    stacks = {name: state.pop(prefix + name) for name in WEIGHTS}
    for e, gid in enumerate(module.ids):
        for name in WEIGHTS:
            state[f"{prefix}{gid}.{name}.weight"] = stacks[name][e]


def _stacked_state_dict(module: GroupedExperts, state: dict, prefix: str, *args) -> None:
    for name in WEIGHTS:
        keys = [f"{prefix}{gid}.{name}.weight" for gid in module.ids]
        if all(k in state for k in keys):
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])


def per_expert_state(model: nn.Module) -> Callable[[str, torch.Tensor], list[tuple[str, int, torch.Size]]]:
    """For ``ZeroAdamW(state_pieces=...)``: the optimizer state of each stacked expert weight of ``model``
    (named as in ``model.named_parameters()``) under its per-expert names, as in ``model.state_dict()``."""
    stacks = {
        f"{prefix}.{name}" if prefix else name: (prefix, module, name)
        for prefix, module in model.named_modules()
        if isinstance(module, GroupedExperts)
        for name in WEIGHTS
    }

    def pieces(name: str, param: torch.Tensor) -> list[tuple[str, int, torch.Size]]:
        if name not in stacks:
            return [(name, 0, param.shape)]
        prefix, module, weight = stacks[name]
        return [(f"{prefix}.{suffix}" if prefix else suffix, off, shape)
                for suffix, off, shape in module.expert_pieces(weight)]

    return pieces
