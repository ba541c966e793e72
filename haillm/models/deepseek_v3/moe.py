"""DeepSeekMoE (report §2.1.2): shared experts plus fine-grained routed experts with auxiliary-loss-free
balancing (a routing-only bias) and the complementary sequence-wise balance loss (its arithmetic and the load
counts in ``haillm.models.deepseek_v3.balance``).

The MoE layer decides routing (``Gate``) and hands token movement to ``self.dispatcher``. ``LocalDispatcher``
is the single-device version; expert parallelism swaps in an all-to-all dispatcher with the same
dispatch / compute / combine methods. The routed experts are one ``GroupedExperts`` module (stacked weights,
grouped GEMMs); a rank may hold only a block of them, and checkpoints name each by its global id.
Routing and dispatch never wait for the device: counts, offsets and permutations stay on it.

``MoE.forward_phases`` is the forward split at the all-to-all exchanges, as a generator, for the pipeline's
overlapped F&B pairs (``haillm.parallel.pipeline.overlap``); ``GraphCut`` is what it needs from its driver.
"""

from collections.abc import Callable, Generator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from haillm.fp8.fused import fp8_input_pow2, swiglu_act_quant
from haillm.fp8.quant import Fp8Pair
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.models.deepseek_v3.balance import SumRows, expert_counts, rows_balance_loss, valid_counts
from haillm.models.deepseek_v3.experts import GroupedExperts
from haillm.models.deepseek_v3.swiglu import swiglu_keeping_inputs
from haillm.ops import Linear
from haillm.parallel.context import NO_CP
from haillm.parallel.tensor import NO_TP


class MLP(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``: the dense FFN and the shared experts. With ``w2`` in FP8
    the SwiGLU also writes its FP8 copy (``fp8.fused.swiglu_act_quant``); ``w1``/``w3`` may take the FP8 copy
    of ``x`` from the norm before (``fp8_input_pow2``). ``keep_swiglu_inputs``: backward keeps only the
    SwiGLU's inputs and recomputes its output (``swiglu.swiglu_keeping_inputs``; eager only: a compiled
    region's partitioner makes its own choice). Tensor parallel (``self.tp``): ``w1``/``w3`` column-parallel
    and ``w2`` row-parallel over the hidden width; the tokens enter along the dimension before the features."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.keep_swiglu_inputs = False
        self.tp = NO_TP

    @property
    def fp8_input_pow2(self) -> bool | None:
        return fp8_input_pow2([self.w1, self.w3])

    def forward(self, x: torch.Tensor, x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        tokens = x.dim() - 2
        x, x_fp8 = self.tp.enter(x, tokens), self.tp.enter_fp8(x_fp8, tokens)
        return self.tp.exit(self._swiglu_ffn(x, x_fp8), tokens)

    def _swiglu_ffn(self, x: torch.Tensor, x_fp8: Fp8Pair | None) -> torch.Tensor:
        a, b = self.w1(x, x_fp8), self.w3(x, x_fp8)
        pow2 = fp8_input_pow2([self.w2])
        if self.keep_swiglu_inputs and not torch.compiler.is_compiling():
            return self.w2(*swiglu_keeping_inputs(a, b, None, pow2))
        if pow2 is None:
            return self.w2(F.silu(a) * b)
        h, h_q, h_s = swiglu_act_quant(a, b, pow2)
        return self.w2(h, (h_q, h_s))


class _GateLogits(torch.autograd.Function):
    """``F.linear(x.float(), weight.float())`` that keeps ``x`` and ``weight`` as they are (bf16 under BF16
    training: half the bytes of the fp32 copies autograd would keep, and a norm output that recompute drops)
    and up-casts them in backward, exactly: the gradients are bitwise autograd's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, dlogits: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = dlogits.mm(weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = x.float().t().mm(dlogits).t().to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Gate(nn.Module):
    """Router: scores ``s = sigmoid|softmax(x W^T)``; experts chosen by top-k on ``s + bias`` within the
    ``n_limited_groups`` groups whose top-2 biased scores sum highest; weights from the unbiased ``s``.

    ``weight`` is a plain parameter (never FP8; bf16 with the other parameters under ``train.dtype=bf16``, its
    scores computed in fp32); ``bias`` is the fp32 balancing buffer, changed only by ``MoE.update_bias`` and
    never by the optimizer.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.norm_topk_prob = args.norm_topk_prob
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: [N, dim]`` -> ``(weights [N, k] fp32, indices [N, k], scores [N, n_routed] fp32 unbiased)``."""
        logits = _GateLogits.apply(x, self.weight)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():
            biased = scores + self.bias
            if self.n_groups > 1:
                grouped = biased.unflatten(-1, (self.n_groups, -1))
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                kept = group_scores.topk(self.topk_groups, dim=-1).indices
                keep_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
                biased = grouped.masked_fill(~keep_mask.unsqueeze(-1), float("-inf")).flatten(1)
            indices = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


class GraphCut(Protocol):
    """Cuts a forward's autograd graph where tokens leave the rank, so that its backward can run piece by
    piece with each gradient exchange in flight between pieces (implemented by the pipeline's ``Tape``)."""

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stand-ins (same values, new graph leaves) for ``tensors``, to be used only after the next exchange."""
        ...

    def exchange(self, sent: torch.Tensor, received: torch.Tensor,
                 send_back: Callable[[torch.Tensor], Callable[[], torch.Tensor]]) -> torch.Tensor:
        """A leaf for ``received``, which an exchange of ``sent`` produced; ``send_back(grad)`` starts the
        reverse exchange of the leaf's gradient and returns a function waiting for the gradient of ``sent``."""
        ...


def drop_storage(t: torch.Tensor) -> None:
    """Free ``t``'s memory, keeping the tensor as an autograd root or leaf (its shape and graph): for a tensor
    that a graph cut holds until backward but whose values nothing reads again (its producer did not save
    it, its consumers have run and saved other tensors)."""
    t.untyped_storage().resize_(0)


class LocalDispatcher:
    """Single-device token movement: sort token copies by expert, run the experts as grouped GEMMs over
    their contiguous slices, scatter the weighted results back in token order. Nothing is dropped.

    ``weights_inside``: the experts apply each copy's gate weight before ``w2`` (``probs``), so the combine
    is a plain sum that keeps nothing and no copy keeps its output (``MoE.gate_weights_inside``)."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: [N, dim]``, ``indices: [N, k]`` -> (token copies grouped by expert ``[N*k, dim]``, ``order``
        (positions in the flattened ``indices``), ``token_ids`` (source token of each copy))."""
        order = indices.flatten().argsort(stable=True)
        token_ids = order // indices.shape[1]
        return x.index_select(0, token_ids), order, token_ids  # its backward is an index_add, unlike x[ids]'s

    def compute(self, experts: GroupedExperts, routed_x: torch.Tensor, counts: torch.Tensor,
                probs: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' grouped GEMMs over their rows (``counts[e]`` rows for row ``e`` of the stacks); with
        ``probs`` (a gate weight per row) applied before ``w2``."""
        return experts(routed_x, counts, probs)

    def combine(
        self, routed_y: torch.Tensor, weights: torch.Tensor | None, order: torch.Tensor, token_ids: torch.Tensor,
        n_tokens: int
    ) -> torch.Tensor:
        """Each token's copies summed, weighted by ``weights`` (None: the experts weighted them already)."""
        if weights is None:
            return SumRows.apply(routed_y, token_ids, n_tokens)
        weighted = routed_y * weights.flatten()[order].unsqueeze(-1).type_as(routed_y)
        return routed_y.new_zeros(n_tokens, routed_y.shape[-1]).index_add(0, token_ids, weighted)

    def __call__(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        experts: GroupedExperts,
        weights_inside: bool = False,
    ) -> torch.Tensor:
        routed_x, order, token_ids = self.dispatch(x, indices)
        if weights_inside:
            routed_y = self.compute(experts, routed_x, counts, weights.flatten().index_select(0, order))
            return self.combine(routed_y, None, order, token_ids, x.shape[0])
        routed_y = self.compute(experts, routed_x, counts)
        return self.combine(routed_y, weights, order, token_ids, x.shape[0])


class MoE(nn.Module):
    """``y = shared(x) + sum_k w_k expert_{i_k}(x)``.

    In training forwards it accumulates ``tokens_per_expert`` (detached fp32 counts, reset by the trainer)
    and, when ``balance_alpha > 0`` and grad is enabled, leaves its sequence-wise balance loss in
    ``self.balance_loss`` for the model's ``compute_loss`` to collect.

    ``gate_weights_inside`` (the model's ``set_recompute(..., swiglu=True)``): every routed copy's gate weight
    travels with it and scales its SwiGLU output before ``w2`` (``swiglu.swiglu_keeping_inputs``), so the
    combine keeps nothing and the experts keep only their inputs; the shared experts keep only their SwiGLU
    inputs too. Equal in exact arithmetic; one product rounds differently.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        self.balance_alpha = args.balance_alpha
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.dim, args.moe_inter_dim, range(args.n_routed_experts))
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts > 0 else None
        )
        self.dispatcher = LocalDispatcher()
        self.gate_weights_inside = False
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None
        self.tp = NO_TP  # the router and the routed experts take this rank's rows; shared_experts has its own
        # context parallelism: the tokens are this rank's chunks of each sequence, whose last ``tail`` tokens are
        # none (an MTP block at depth k runs on the whole length; its last k positions have no target)
        self.cp, self.tail = NO_CP, 0

    def route(self, rows: torch.Tensor, first: int, bsz: int, seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate ``rows: [n, dim]``, rows ``first..first+n-1`` of the ``[bsz, seq_len]`` tokens this rank sees
        (all of them at tp=1), -> (weights, indices, per-expert counts); in training also count the loads and
        leave the balance loss (``_statistics``)."""
        weights, indices, scores = self.gate(rows)
        counts = expert_counts(indices, self.n_routed_experts)
        if self.training:
            self._statistics(scores, indices, counts, first, bsz, seq_len)
        return weights, indices, counts

    def _statistics(self, scores: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, first: int, bsz: int,
                    seq_len: int) -> None:
        """Add the routed rows' loads to ``tokens_per_expert`` and leave the balance loss over whole sequences,
        whose statistics the tensor- and context-parallel ranks sum. This rank's rows of each sequence: a
        sequence shard under sequence parallelism (``seq_len`` of ``seq_len * tp.seq_factor`` local tokens),
        rows ``first..`` of the flattened ``[bsz, seq_len]`` in replicated mode; under context parallelism the
        local tokens are this rank's chunks, whose last ``tail`` positions (on the rank holding the sequence's
        end) are none and left out."""
        tp, n = self.tp, scores.shape[0]
        local_len = seq_len * tp.seq_factor
        drop = self.tail if self.cp.holds_end else 0
        aligned = first == 0 and n == bsz * seq_len  # every row of this rank's part of its sequences, in order
        seq_ids = valid = None
        if not aligned or drop:
            row = torch.arange(first, first + n, device=scores.device)
            seq_ids = None if aligned else row // seq_len
            if drop:
                offset = tp.rank * seq_len if tp.seq_factor > 1 else 0  # this sequence shard's first position
                valid = (row % seq_len + offset < local_len - drop).to(scores.dtype)
        self.tokens_per_expert += counts if valid is None else valid_counts(indices, self.n_routed_experts, valid)
        if self.balance_alpha > 0 and torch.is_grad_enabled():
            whole = local_len * self.cp.size - self.tail
            self.balance_loss = rows_balance_loss(scores, indices, seq_ids, bsz, whole, self.balance_alpha,
                                                  (tp, self.cp), valid)

    @property
    def fp8_input_pow2(self) -> bool | None:
        """The shared experts' (the gate and the routed experts take the high-precision input)."""
        return self.shared_experts.fp8_input_pow2 if self.shared_experts is not None else None

    def forward(self, x: torch.Tensor, x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        """``x: [B, T, dim]``; ``x_fp8``: ``act_quant(x)`` for the shared experts' FP8 ``w1``/``w3``. Under
        tensor parallelism the router and the routed experts take this rank's rows (``tp.shard_rows``)."""
        bsz, seq_len, dim = x.shape
        flat = x.reshape(-1, dim)
        rows, first = self.tp.shard_rows(flat)
        weights, indices, counts = self.route(rows, first, bsz, seq_len)
        y = self.dispatcher(rows, weights, indices, counts, self.experts, self.gate_weights_inside)
        y = self.tp.unshard_rows(y, flat.shape[0])
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat, _rows(x_fp8))
        return y.view(bsz, seq_len, dim)

    @property
    def exchanges_tokens(self) -> bool:
        """True when the dispatcher sends tokens to other ranks in split phases (expert parallelism)."""
        return hasattr(self.dispatcher, "announce_dispatch")

    def forward_phases(self, x: torch.Tensor, cut: GraphCut, x_fp8: Fp8Pair | None = None
                       ) -> Generator[None, None, torch.Tensor]:
        """``forward`` as a generator that yields right after starting each exchange (dispatch, combine), so
        that its driver can run other work while the tokens are in flight, and returns the output. The
        shared experts run while the dispatch's row counts travel. The graph is cut at both exchanges
        (``cut``); the values are exactly ``forward``'s."""
        if not self.exchanges_tokens:
            return self.forward(x, x_fp8)
        bsz, seq_len, dim = x.shape
        flat = x.reshape(-1, dim)
        rows, first = self.tp.shard_rows(flat)
        weights, indices, counts = self.route(rows, first, bsz, seq_len)
        d, inside = self.dispatcher, self.gate_weights_inside
        plan = d.announce_dispatch(rows, indices, counts, weights if inside else None)
        # the shared experts run while the counts travel; their output is carried to the add after the combine
        # (their input would be a second carried copy of the norm output, which recompute does not keep)
        shared_out = self.shared_experts(flat, _rows(x_fp8)) if self.shared_experts is not None else None
        shared = None if shared_out is None else cut(shared_out)[0]
        if not inside:
            (weights,) = cut(weights)  # used again after the combine
        if self.balance_loss is not None:
            (self.balance_loss,) = cut(self.balance_loss)
        handle = d.send_dispatch(plan)
        yield
        routed_x, local_counts, probs = d.finish_dispatch(handle, cut)
        combine = d.start_combine(d.compute(self.experts, routed_x, local_counts, probs), handle)
        yield
        y = self.tp.unshard_rows(d.finish_combine(combine, None if inside else weights, cut), flat.shape[0])
        if shared is not None:
            y = y + shared
            drop_storage(shared_out)  # held by the cut as a root only: w2 does not save its output
        return y.view(bsz, seq_len, dim)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free step: ``b_i += gamma * sign(mean(load) - load_i)`` from the global load of one step."""
        load = load.to(self.gate.bias)
        self.gate.bias += gamma * torch.sign(load.mean() - load)


def _rows(pair: Fp8Pair | None) -> Fp8Pair | None:
    """An FP8 pair of ``[B, T, dim]`` as the pair of its ``[B*T, dim]`` rows."""
    return None if pair is None else (pair[0].flatten(0, -2), pair[1].flatten(0, -2))
