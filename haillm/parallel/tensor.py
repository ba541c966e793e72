"""Tensor and sequence parallelism: the collectives at the edges of a tensor-parallel region.

A module that splits its work over the ``tp`` ranks (attention by heads, an FFN by its hidden width, the
output head by vocabulary) calls ``tp.enter`` on its input and ``tp.exit`` on its partial output; every
module holds a ``TensorParallel`` as ``self.tp`` (``NO_TP`` by default, whose methods are the identity), so
the model code reads the same at every tp. Two modes (Megatron's f/g and their sequence-parallel forms):

- **Sequence parallel** (``sequence_parallel=True``): between regions the activations are split along the
  sequence. ``enter`` all-gathers them (backward: reduce-scatter of the partial gradients), ``exit``
  reduce-scatters the partial sums back to sequence shards (backward: all-gather). Norms, residuals, the
  router and the routed experts work on the shard.
- **Replicated** (``sequence_parallel=False``): the activations are whole on every rank. ``enter`` is the
  identity whose backward all-reduces; ``exit`` all-reduces (backward: the identity).

The MoE layer's router and routed experts always work on a split of the tokens (``shard_rows``): whole in
sequence-parallel mode, where the input is a shard already, and this rank's contiguous block of rows in
replicated mode (``unshard_rows`` puts them back together). So no routed token is processed twice, and the
gate's weight gets a partial gradient on every rank in both modes (``haillm.parallel.tensor_plan``).

Everything is an explicit collective in an autograd Function, not ``torch.distributed.tensor``: DTensor's
sharding propagation does not see through the custom ``Linear`` op, the FP8 path (act_quant tiles, cached
weight copies), ZeRO-1's flat buckets or the pipeline's graph cuts, and each of those would need a
``to_local`` at its edge. Every collective is synchronous (NCCL's rules: none is read before it is waited).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from haillm.parallel.collectives import all_gather_single, reduce_scatter_single


def _gather(x: Tensor, dim: int, group: dist.ProcessGroup, size: int) -> Tensor:
    """All-gather ``x`` along ``dim`` (rank order)."""
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0], *front.shape[1:]))
    all_gather_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, dim: int, group: dist.ProcessGroup, size: int) -> Tensor:
    """Sum ``x`` over the group and keep this rank's block along ``dim``."""
    front = x.movedim(dim, 0).contiguous()
    if front.shape[0] % size:
        raise ValueError(f"cannot reduce-scatter {front.shape[0]} rows over {size} tensor-parallel ranks")
    out = front.new_empty((front.shape[0] // size, *front.shape[1:]))
    reduce_scatter_single(out, front, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim).contiguous()


def _all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _rows(x: Tensor, n: int, tp: TensorParallel) -> Tensor:
    lo, hi = tp.row_range(n)
    return x[lo:hi].contiguous()


def _gather_rows(x: Tensor, n: int, tp: TensorParallel) -> Tensor:
    """Every rank's ``row_range(n)`` block of rows, concatenated into ``[n, ...]``."""
    chunk = -(-n // tp.size)
    padded = x.new_zeros((chunk, *x.shape[1:]))
    padded[: x.shape[0]] = x
    return _gather(padded, 0, tp.group, tp.size)[:n]  # only the last ranks are short: the valid rows come first


def _collective(kind: str, x: Tensor, tp: TensorParallel, dim: int, n: int) -> Tensor:
    if kind == "identity":
        return x.view_as(x)
    if kind == "all_reduce":
        return _all_reduce(x, tp.group)
    if kind == "gather":
        return _gather(x, dim, tp.group, tp.size)
    if kind == "reduce_scatter":
        return _reduce_scatter(x, dim, tp.group, tp.size)
    if kind == "block":
        return x.chunk(tp.size, dim)[tp.rank].contiguous()
    if kind == "rows":
        return _rows(x, n, tp)
    if kind == "gather_rows":
        return _gather_rows(x, n, tp)
    raise ValueError(f"unknown collective {kind!r}")


class _Edge(torch.autograd.Function):
    """One collective forward and its adjoint backward (``_collective`` kinds), e.g. Megatron's f (identity,
    then all-reduce), g (all-reduce, then identity), and the sequence-parallel all-gather / reduce-scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TensorParallel, dim: int, n: int, forward_kind: str, backward_kind: str
                ) -> Tensor:
        ctx.tp, ctx.dim, ctx.n, ctx.backward_kind = tp, dim, n, backward_kind
        return _collective(forward_kind, x, tp, dim, n)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _collective(ctx.backward_kind, grad, ctx.tp, ctx.dim, ctx.n), None, None, None, None, None


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """One tensor-parallel group and mode. ``group=None`` (``NO_TP``) is tp=1: every method is the identity."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def seq_factor(self) -> int:
        """How many times longer the whole sequence is than the activations between regions."""
        return self.size if self.enabled and self.sequence_parallel else 1

    def replicated(self) -> TensorParallel:
        """The same group in replicated mode (the MTP modules, whose sequences are one token shorter)."""
        return TensorParallel(self.group, self.size, self.rank, False) if self.sequence_parallel else self

    def _edge(self, x: Tensor, dim: int, sequence_parallel: tuple[str, str], replicated: tuple[str, str]) -> Tensor:
        if not self.enabled:
            return x
        return _Edge.apply(x, self, dim, 0, *(sequence_parallel if self.sequence_parallel else replicated))

    def enter(self, x: Tensor, dim: int = 1) -> Tensor:
        """Into a region: the whole tensor, on every rank (sequence parallel: gathered along ``dim``)."""
        return self._edge(x, dim, ("gather", "reduce_scatter"), ("identity", "all_reduce"))

    def enter_fp8(self, pair: tuple[Tensor, Tensor] | None, dim: int = 1) -> tuple[Tensor, Tensor] | None:
        """``enter`` for an FP8 copy (data and scales, no gradient): gathered in sequence-parallel mode."""
        if pair is None or not self.enabled or not self.sequence_parallel:
            return pair
        data, scales = pair
        gathered = _gather(data.view(torch.uint8), dim, self.group, self.size).view(data.dtype)
        return gathered, _gather(scales, dim, self.group, self.size)

    def exit(self, y: Tensor, dim: int = 1) -> Tensor:
        """Out of a region: ``y`` is this rank's partial sum; the total (sequence parallel: its shard)."""
        return self._edge(y, dim, ("reduce_scatter", "gather"), ("all_reduce", "identity"))

    def gather_sequence(self, x: Tensor, dim: int = 1) -> Tensor:
        """A sequence-parallel shard made whole for replicated use (its gradient is then the same on every
        rank, so backward keeps this rank's block). The identity in replicated mode."""
        if not self.enabled or not self.sequence_parallel:  # replicated: nothing to gather, no graph node
            return x
        return _Edge.apply(x, self, dim, 0, "gather", "block")

    def row_range(self, n: int) -> tuple[int, int]:
        """This rank's rows of ``n`` under ``shard_rows`` in replicated mode: blocks of ``ceil(n / size)``."""
        chunk = -(-n // self.size)
        return min(n, self.rank * chunk), min(n, (self.rank + 1) * chunk)

    def shard_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """``(rows, first)``: the rows of ``x: [N, d]`` this rank routes and the index of the first in ``x``:
        all of them where ``x`` is a shard already (sequence parallel) or tp is 1."""
        if not self.enabled or self.sequence_parallel:
            return x, 0
        n = x.shape[0]
        return _Edge.apply(x, self, 0, n, "rows", "gather_rows"), self.row_range(n)[0]

    def unshard_rows(self, y: Tensor, n: int) -> Tensor:
        """Undo ``shard_rows`` for an output of the same rows: every rank's block, ``[n, d]``."""
        if not self.enabled or self.sequence_parallel:
            return y
        return _Edge.apply(y, self, 0, n, "gather_rows", "rows")

    def sum_partials(self, x: Tensor) -> Tensor:
        """Sum over the group of a statistic each rank computed from its own rows (backward: identity)."""
        return _Edge.apply(x, self, 0, 0, "all_reduce", "identity") if self.enabled else x


NO_TP = TensorParallel()
