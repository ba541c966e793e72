"""Expert parallelism: routed experts split over the ranks of an expert-parallel (EP) group, tokens moved to
them and back with uneven ``all_to_all_single`` exchanges (REFERENCE §5, §6.1).

``ExpertPlacement`` says which global expert ids live on which EP rank: contiguous blocks, so sorting token
copies by expert also sorts them by destination rank, and a node (consecutive EP ranks) holds whole expert
groups, so the gate's group-limited top-k (``n_limited_groups``) bounds the nodes each token reaches.

``AllToAllDispatcher`` is the multi-rank twin of ``moe.LocalDispatcher`` (the MoE layer calls either as
``dispatcher(x, weights, indices, counts, experts)``). One token copy is sent per (token, chosen expert);
gate weights are applied on the source rank after the combine, so their gradient stays local, or, with
``weights_inside`` (``MoE.gate_weights_inside``), they travel with their copies (4 bytes each, their bits
appended to the payload row) and come back as gradients with the dispatch's reverse exchange. Each
exchange can be started and finished separately (``start_dispatch`` / ``finish_dispatch``,
``start_combine`` / ``finish_combine``) so a scheduler can compute while tokens are in flight; the dispatch's
short count exchange (it sizes the payload) can itself be overlapped: ``start_dispatch`` is
``send_dispatch(announce_dispatch(...))``. The
communication runs on detached tensors; ``finish_*`` attaches the received tensor to the sender's graph
through ``_Exchanged``, whose backward is the reverse exchange of gradients (backward of dispatch is a
combine and vice versa), synchronous inside autograd. Given a ``moe.GraphCut`` (the pipeline's overlapped
F&B pairs), ``finish_*`` instead hands the received tensor to the cut as a new leaf together with a
``send_back`` function that starts the reverse exchange of its gradient and returns a waiter: the backward
exchanges are then asynchronous too, started and finished by whoever runs the backward piece by piece.
``comm_wait_s`` sums the time spent blocked in waits for exchanges (forward and backward), the exposed part
of the communication.

With ``fp8=True`` dispatched tokens travel as E4M3 with 1x128 fp32 scales (``haillm.fp8.act_quant``),
packed in one uint8 buffer (gloo cannot reduce or exchange fp8 tensors); combine and all gradients stay in
the activations' dtype, as in DeepSeek-V3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from haillm.fp8 import FP8_DTYPE, act_dequant, act_quant
from haillm.models.deepseek_v3.balance import expert_counts
from haillm.models.deepseek_v3.experts import GroupedExperts
from haillm.models.deepseek_v3.moe import GraphCut, LocalDispatcher, MoE, drop_storage
from haillm.parallel.expert_payload import PackRows, UnpackRows
from haillm.parallel.mesh import ParallelConfigError, ParallelDims

FP8_BLOCK = 128


@dataclass(frozen=True)
class ExpertPlacement:
    """Rank ``r`` of an EP group of ``ep_size`` holds experts ``[r*E/ep, (r+1)*E/ep)``; nodes are consecutive
    blocks of ``ranks_per_node`` EP ranks (None: the whole group is one node)."""

    n_routed_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    ranks_per_node: int | None = None
    n_expert_groups: int = 1

    def __post_init__(self) -> None:
        e, ep, rpn = self.n_routed_experts, self.ep_size, self.ranks_per_node
        if ep < 1 or not 0 <= self.ep_rank < ep:
            raise ParallelConfigError(f"ep_rank={self.ep_rank} must be in [0, parallel.ep={ep})")
        if e % ep:
            raise ParallelConfigError(f"model.n_routed_experts={e} is not divisible by parallel.ep={ep}")
        if rpn is not None and (rpn < 1 or (rpn < ep and ep % rpn)):
            raise ParallelConfigError(f"parallel.ep={ep} is not a whole number of nodes of {rpn} ranks")
        group_size = e // self.n_expert_groups
        if self.n_expert_groups > 1 and self.experts_per_node % group_size:
            raise ParallelConfigError(
                f"a node holds {self.experts_per_node} experts but an expert group has {group_size}: groups "
                f"must not straddle nodes (model.n_expert_groups={self.n_expert_groups}, parallel.ep={ep}, "
                f"{self.ep_ranks_per_node} EP ranks per node)"
            )

    @classmethod
    def from_dims(cls, dims: ParallelDims, n_routed_experts: int, n_expert_groups: int = 1) -> ExpertPlacement:
        """Placement for this rank of ``dims``; nodes come from ``dims.ranks_per_node`` (global ranks)."""
        nodes = [dims.node_of(g) for g in dims.ep_group_ranks()]
        runs = [nodes.count(n) for n in dict.fromkeys(nodes)]
        if len(set(runs)) != 1:
            raise ParallelConfigError(
                f"the EP group's ranks {dims.ep_group_ranks()} split unevenly over nodes of "
                f"parallel.ranks_per_node={dims.ranks_per_node}"
            )
        return cls(n_routed_experts, dims.ep, dims.ep_rank, runs[0], n_expert_groups)

    @property
    def experts_per_rank(self) -> int:
        return self.n_routed_experts // self.ep_size

    @property
    def ep_ranks_per_node(self) -> int:
        return min(self.ranks_per_node or self.ep_size, self.ep_size)

    @property
    def n_nodes(self) -> int:
        return self.ep_size // self.ep_ranks_per_node

    @property
    def experts_per_node(self) -> int:
        return self.experts_per_rank * self.ep_ranks_per_node

    @property
    def local_expert_ids(self) -> range:
        return range(self.ep_rank * self.experts_per_rank, (self.ep_rank + 1) * self.experts_per_rank)

    def rank_of(self, expert_ids: torch.Tensor) -> torch.Tensor:
        return expert_ids // self.experts_per_rank

    def is_local(self, expert_id: int) -> bool:
        return expert_id in self.local_expert_ids


@dataclass
class _Transfer:
    """One uneven exchange: ``send`` rows split ``in_splits`` over peers, ``out_splits`` rows into ``recv``
    (replaced by the dequantized rows once an FP8 dispatch finishes). Holds both buffers while in flight."""

    send: torch.Tensor
    recv: torch.Tensor
    in_splits: list[int]
    out_splits: list[int]
    work: dist.Work


def _start_transfer(send: torch.Tensor, in_splits: list[int], out_splits: list[int], group) -> _Transfer:
    send = send.detach().contiguous()
    recv = send.new_empty((sum(out_splits), *send.shape[1:]))
    work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=group, async_op=True)
    return _Transfer(send, recv, in_splits, out_splits, work)


class _Exchanged(torch.autograd.Function):
    """Identity from the sent tensor to the already received one; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, sent: torch.Tensor, transfer: _Transfer, dispatcher: AllToAllDispatcher) -> torch.Tensor:
        ctx.splits, ctx.dispatcher = (transfer.in_splits, transfer.out_splits), dispatcher
        return transfer.recv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.dispatcher._send_back(ctx.splits, grad)(), None, None


@dataclass
class DispatchPlan:
    """A dispatch whose per-expert row counts are in flight (``announce_dispatch``): ``send_counts[r, e]``
    rows go to expert ``e`` of rank ``r``; ``recv_counts`` fills in as ``work`` completes."""

    x: torch.Tensor
    sent: torch.Tensor
    order: torch.Tensor
    token_ids: torch.Tensor
    send_counts: torch.Tensor
    recv_counts: torch.Tensor
    work: dist.Work
    probs: torch.Tensor | None = None  # the copies' gate weights, in ``sent``'s order (``weights_inside``)


@dataclass
class DispatchHandle:
    """State of one dispatch, needed by its combine. ``order``/``token_ids`` mean what they mean in
    ``LocalDispatcher``; ``recv_counts[s, e]`` is the number of rows source rank ``s`` sends to local expert
    ``e``; ``arrange`` reorders received rows from source-major (as they arrive) to expert-major; ``wire`` is
    what the exchange carries in the graph: ``sent``, or ``sent`` packed with the gate weights (``PackRows``)."""

    sent: torch.Tensor
    order: torch.Tensor
    token_ids: torch.Tensor
    n_tokens: int
    recv_counts: torch.Tensor
    arrange: torch.Tensor
    transfer: _Transfer
    fp8_dtype: torch.dtype | None
    wire: torch.Tensor
    with_probs: bool


@dataclass
class CombineHandle:
    dispatch: DispatchHandle
    sent: torch.Tensor
    transfer: _Transfer


class AllToAllDispatcher:
    """Token movement over an EP group (see the module docstring). One instance may serve every MoE layer;
    ``stats()`` then averages over all of them since the last ``reset_stats()``."""

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement, fp8: bool = False) -> None:
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        if (size, rank) != (placement.ep_size, placement.ep_rank):
            raise ParallelConfigError(
                f"EP group rank {rank} of {size}, placement for rank {placement.ep_rank} of {placement.ep_size}"
            )
        self.group, self.placement, self.fp8 = group, placement, fp8
        self._local = LocalDispatcher()
        self.reset_stats()

    # ---- dispatch ----
    def start_dispatch(
        self, x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None = None,
        weights: torch.Tensor | None = None
    ) -> DispatchHandle:
        """Sort token copies by expert, exchange per-expert counts (a short exchange that sizes the
        payload), then start the payload exchange. ``x: [N, dim]``, ``indices: [N, k]`` global expert ids,
        ``counts``: the bincount of ``indices`` over all experts (computed when None); ``weights [N, k]``: the
        gate weights to send with the copies (``weights_inside``), or None."""
        return self.send_dispatch(self.announce_dispatch(x, indices, counts, weights))

    def announce_dispatch(
        self, x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None = None,
        weights: torch.Tensor | None = None
    ) -> DispatchPlan:
        """The first half of ``start_dispatch``: sort token copies by expert and start the count exchange."""
        p = self.placement
        if counts is None:
            counts = expert_counts(indices, p.n_routed_experts)
        self._record_stats(indices)
        sent, order, token_ids = self._local.dispatch(x, indices)
        send_counts = counts.to(torch.int64).reshape(p.ep_size, p.experts_per_rank).contiguous()
        recv_counts = torch.empty_like(send_counts)
        work = dist.all_to_all_single(recv_counts, send_counts, group=self.group, async_op=True)
        probs = None if weights is None else weights.flatten().index_select(0, order)
        return DispatchPlan(x, sent, order, token_ids, send_counts, recv_counts, work, probs)

    def send_dispatch(self, plan: DispatchPlan) -> DispatchHandle:
        """The second half of ``start_dispatch``: wait for the counts, start the payload exchange."""
        p, x, sent, send_counts, recv_counts = self.placement, plan.x, plan.sent, plan.send_counts, plan.recv_counts
        self._wait(plan.work)
        in_splits, out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        segment = torch.arange(recv_counts.numel(), device=x.device).repeat_interleave(
            recv_counts.flatten(), output_size=sum(out_splits))  # sized on the host: no wait for the device
        arrange = ((segment % p.experts_per_rank) * p.ep_size + segment // p.experts_per_rank).argsort(stable=True)
        wire = sent if plan.probs is None else PackRows.apply(sent, plan.probs)
        payload = wire.detach()
        if self.fp8:
            q, s = act_quant(sent.detach(), FP8_BLOCK)
            parts = [q.view(torch.uint8), s.view(torch.uint8)]
            if plan.probs is not None:
                parts.append(payload[:, sent.shape[1]:].contiguous().view(torch.uint8))
            payload = torch.cat(parts, dim=1)
        self._bytes[0] += self._off_rank_bytes(payload, in_splits)
        transfer = _start_transfer(payload, in_splits, out_splits, self.group)
        fp8_dtype = x.dtype if self.fp8 else None
        return DispatchHandle(sent, plan.order, plan.token_ids, x.shape[0], recv_counts, arrange, transfer, fp8_dtype,
                              wire, plan.probs is not None)

    def finish_dispatch(self, handle: DispatchHandle, cut: GraphCut | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Wait for the tokens; return them grouped by local expert, the rows per local expert, and the rows'
        gate weights where they were sent (else None)."""
        t = handle.transfer
        self._wait(t.work)
        dim = handle.sent.shape[1]
        if handle.fp8_dtype is not None:
            scales = 4 * math.ceil(dim / FP8_BLOCK)
            q = t.recv[:, :dim].contiguous().view(FP8_DTYPE)
            s = t.recv[:, dim : dim + scales].contiguous().view(torch.float32)
            rows = act_dequant(q, s, FP8_BLOCK, handle.fp8_dtype)
            if handle.with_probs:  # the gate weights' bits follow the scales
                rows = torch.cat([rows, t.recv[:, dim + scales :].contiguous().view(rows.dtype)], dim=1)
            t.recv = rows
        received = self._attach(handle.wire, t, cut)
        if handle.with_probs:
            rows, probs = UnpackRows.apply(received, dim, handle.arrange)
        else:
            rows, probs = received.index_select(0, handle.arrange), None
        if cut is not None:  # the cut holds both ends until backward, as autograd root and leaf only
            for end in (handle.sent, handle.wire, received):
                drop_storage(end)
        return rows, handle.recv_counts.sum(0), probs

    def dispatch(
        self, x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None = None,
        weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, DispatchHandle]:
        handle = self.start_dispatch(x, indices, counts, weights)
        routed_x, local_counts, probs = self.finish_dispatch(handle)
        return routed_x, local_counts, probs, handle

    # ---- expert compute ----
    def compute(self, experts: GroupedExperts, routed_x: torch.Tensor, local_counts: torch.Tensor,
                probs: torch.Tensor | None = None) -> torch.Tensor:
        """The local experts (this rank's block, ``apply_expert_parallel``) on their rows, as ``LocalDispatcher``."""
        return self._local.compute(experts, routed_x, local_counts, probs)

    # ---- combine ----
    def start_combine(self, routed_y: torch.Tensor, handle: DispatchHandle) -> CombineHandle:
        """Put expert outputs back in the order they arrived and start sending them home, in the dtype the
        tokens left in (every rank must put the same dtype on the wire, whatever its experts computed in)."""
        sent = routed_y.index_select(0, handle.arrange.argsort()).to(handle.sent.dtype)
        t = handle.transfer
        self._bytes[1] += self._off_rank_bytes(sent, t.out_splits)
        return CombineHandle(handle, sent, _start_transfer(sent, t.out_splits, t.in_splits, self.group))

    def finish_combine(self, handle: CombineHandle, weights: torch.Tensor | None, cut: GraphCut | None = None
                       ) -> torch.Tensor:
        """Wait for the outputs; weighted sum per token, ``[N, dim]`` in the original token order (``weights``
        None: the experts applied them)."""
        t, d = handle.transfer, handle.dispatch
        self._wait(t.work)
        back = self._attach(handle.sent, t, cut)
        y = self._local.combine(back, weights, d.order, d.token_ids, d.n_tokens)  # the same weighted sum
        if cut is not None:  # as in finish_dispatch; the weighted sum keeps the received rows for its backward
            for end in (handle.sent,) if weights is not None else (handle.sent, back):
                drop_storage(end)
        return y

    def combine(self, routed_y: torch.Tensor, weights: torch.Tensor | None, handle: DispatchHandle) -> torch.Tensor:
        return self.finish_combine(self.start_combine(routed_y, handle), weights)

    def __call__(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        experts: GroupedExperts,
        weights_inside: bool = False,
    ) -> torch.Tensor:
        routed_x, local_counts, probs, handle = self.dispatch(x, indices, counts, weights if weights_inside else None)
        return self.combine(self.compute(experts, routed_x, local_counts, probs), None if weights_inside else weights,
                            handle)

    # ---- autograd across an exchange ----
    def _attach(self, sent: torch.Tensor, transfer: _Transfer, cut: GraphCut | None) -> torch.Tensor:
        """The received tensor as part of the graph: through ``_Exchanged``, or as a leaf of ``cut``."""
        if cut is None:
            return _Exchanged.apply(sent, transfer, self)
        splits = (transfer.in_splits, transfer.out_splits)  # not the transfer: its buffers can go now
        return cut.exchange(sent, transfer.recv, lambda grad: self._send_back(splits, grad))

    def _send_back(self, splits: tuple[list[int], list[int]], grad: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start sending the gradient of a received tensor to where its rows came from (``splits``: the
        forward exchange's in/out splits); the returned function waits and gives the sent tensor's gradient."""
        in_splits, out_splits = splits
        back = _start_transfer(grad, out_splits, in_splits, self.group)

        def finish() -> torch.Tensor:
            self._wait(back.work)
            return back.recv

        return finish

    def _wait(self, work: dist.Work) -> None:
        start = time.perf_counter()
        work.wait()
        self.comm_wait_s += time.perf_counter() - start

    # ---- statistics ----
    def reset_stats(self) -> None:
        self.comm_wait_s = 0.0
        self._routing: torch.Tensor | None = None  # tokens, rank hits, node hits: on the tokens' device
        self._maxima: torch.Tensor | None = None  # ranks, nodes per token
        self._bytes = [0, 0]  # sent off-rank by dispatch, combine

    def _record_stats(self, indices: torch.Tensor) -> None:
        """Accumulated on the device without reading anything back: no host sync per MoE layer."""
        p = self.placement
        if self._routing is None:
            self._routing = torch.zeros(3, dtype=torch.float64, device=indices.device)
            self._maxima = torch.zeros(2, dtype=torch.float64, device=indices.device)
        if not indices.shape[0]:
            return
        hit = torch.zeros(indices.shape[0], p.ep_size, dtype=torch.bool, device=indices.device)
        hit.scatter_(1, p.rank_of(indices), True)
        ranks = hit.sum(1)
        nodes = hit.view(-1, p.n_nodes, p.ep_ranks_per_node).any(-1).sum(1)
        self._routing += torch.stack([ranks.new_full((), indices.shape[0]), ranks.sum(), nodes.sum()])
        self._maxima = torch.maximum(self._maxima, torch.stack([ranks.max(), nodes.max()]))

    def _off_rank_bytes(self, payload: torch.Tensor, splits: list[int]) -> int:
        """Bytes this rank sends to other ranks (its own rows stay in memory)."""
        rows = sum(splits) - splits[self.placement.ep_rank]
        return rows * math.prod(payload.shape[1:]) * payload.element_size()

    def stats(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Averages since ``reset_stats()``: distinct EP ranks and nodes each token was sent to (and their
        maxima), and bytes sent off-rank per phase. With ``group``, over all its ranks (collective)."""
        routing = self._routing if self._routing is not None else torch.zeros(3, dtype=torch.float64)
        maxima = self._maxima.clone() if self._maxima is not None else torch.zeros(2, dtype=torch.float64)
        sums = torch.cat([routing, routing.new_tensor(self._bytes)])
        if group is not None and dist.is_initialized():
            nccl = dist.get_backend(group) == "nccl"  # NCCL reduces GPU tensors only
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            sums, maxima = sums.to(device), maxima.to(device)
            dist.all_reduce(sums, group=group)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        sums, maxima = sums.cpu(), maxima.cpu()
        tokens = max(sums[0].item(), 1.0)
        return {
            "ranks_per_token": sums[1].item() / tokens,
            "nodes_per_token": sums[2].item() / tokens,
            "max_ranks_per_token": maxima[0].item(),
            "max_nodes_per_token": maxima[1].item(),
            "dispatch_bytes": sums[3].item(),
            "combine_bytes": sums[4].item(),
        }


def apply_expert_parallel(model: nn.Module, dispatcher: AllToAllDispatcher) -> nn.Module:
    """Keep only this rank's block of experts (checkpoints keep naming them by global id) in every MoE layer
    of ``model`` and route through ``dispatcher``. In place (build ``model`` on the meta device to never hold
    the other experts); returns ``model``."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.experts.keep(dispatcher.placement.local_expert_ids)
            module.dispatcher = dispatcher
    return model
