"""ZeRO-1 bucket layout as a pure function of parameter names, shapes and dtypes.

``ZeroAdamW`` allocates its flat buffers (``Bucket``) from this plan, and the layout planner (``haillm.tools.plan``)
predicts a rank's memory from the same plan without building anything, so the two cannot drift. Each
param group's parameters are packed in reverse registration order (about the order backward produces their
gradients) into buckets of roughly ``bucket_bytes`` (counted as fp32), never mixing dtypes or devices; a
bucket is padded to a multiple of its group's size, and buckets are listed in gradient-ready order.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

FP32_BYTES = 4


@dataclass(frozen=True)
class ParamSpec:
    """What the bucket layout needs of a parameter. ``key`` identifies tied parameters (default: the name)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"
    key: Hashable | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def identity(self) -> Hashable:
        return self.name if self.key is None else self.key


@dataclass(frozen=True)
class BucketPlan:
    """One bucket: param group ``group``, its members (indices into that group's list) at ``offsets`` in a
    flat buffer of ``numel`` elements (padded to a multiple of ``world``, the group's size)."""

    group: int
    members: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    world: int
    dtype: torch.dtype

    @property
    def shard_numel(self) -> int:
        return self.numel // self.world

    def param_bytes(self) -> int:
        """The parameters' storage (the model's parameters are views of it)."""
        return self.numel * self.dtype.itemsize

    def grad_bytes(self) -> int:
        """The fp32 gradient buffer, whatever the parameters' dtype."""
        return self.numel * FP32_BYTES

    def reduce_bytes(self, reduce_dtype: torch.dtype) -> int:
        """What the reduce-scatter sends from: the fp32 gradient buffer, or its copy in ``reduce_dtype``
        (``ZeroAdamW(reduce_dtype=...)``)."""
        return self.numel * reduce_dtype.itemsize

    def reduce_copy_bytes(self, reduce_dtype: torch.dtype) -> int:
        """That copy, alive until ``finish_grad_sync``: none for an fp32 reduction or an unreplicated bucket."""
        return self.reduce_bytes(reduce_dtype) if self.world > 1 and reduce_dtype != torch.float32 else 0

    def state_bytes(self, moment_dtype: torch.dtype) -> int:
        """Optimizer state this rank adds: both Adam moments of its shard, and an fp32 master shard unless
        the parameters are fp32 (then the master shard is the rank's slice of the parameter storage)."""
        master = 0 if self.dtype == torch.float32 else self.shard_numel * FP32_BYTES
        return master + 2 * self.shard_numel * moment_dtype.itemsize


def plan_buckets(groups: Sequence[Sequence[ParamSpec]], worlds: Sequence[int], bucket_bytes: int
                 ) -> list[BucketPlan]:
    """The buckets of ``groups`` (each in registration order; ``worlds[i]``: group i's size), in launch
    order. A tied parameter (same ``identity`` twice) is bucketed once, in the first group that holds it."""
    order: dict[Hashable, int] = {}  # reverse registration position: ≈ gradient-ready order
    registered = [s for g in groups for s in g]
    for i, spec in enumerate(reversed(registered)):
        order.setdefault(spec.identity, i)
    seen: set[Hashable] = set()
    pending: list[tuple[int, BucketPlan]] = []
    for gi, (specs, world) in enumerate(zip(groups, worlds, strict=True)):
        members = []
        for i in reversed(range(len(specs))):
            if specs[i].identity not in seen:
                seen.add(specs[i].identity)
                members.append(i)
        chunk: list[int] = []
        for k, i in enumerate(members):
            chunk.append(i)
            spec = specs[i]
            last = k == len(members) - 1
            full = sum(specs[j].numel for j in chunk) * FP32_BYTES >= bucket_bytes
            if last or full or specs[members[k + 1]].dtype != spec.dtype or specs[members[k + 1]].device != spec.device:
                pending.append((order[spec.identity], _bucket(gi, chunk, specs, world)))
                chunk = []
    return [b for _, b in sorted(pending, key=lambda kb: kb[0])]


def _bucket(group: int, members: list[int], specs: Sequence[ParamSpec], world: int) -> BucketPlan:
    offsets, total = [], 0
    for i in members:
        offsets.append(total)
        total += specs[i].numel
    numel = -(-total // world) * world
    return BucketPlan(group, tuple(members), tuple(offsets), numel, world, specs[members[0]].dtype)


@dataclass
class Bucket:
    """One allocated bucket of ``ZeroAdamW``: its parameters' flat storage, the fp32 gradient buffer, this
    rank's shard of the optimizer state, and the progress of its reduction and gather."""

    group: dict[str, Any]
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]  # start of each param in the flat bucket
    numel: int  # padded to a multiple of `world`
    world: int
    rank: int
    param_buf: Tensor  # the parameters' storage (param dtype)
    grad_buf: Tensor  # fp32 local gradients
    shard_grad: Tensor  # fp32 reduced (averaged) gradient shard
    state: dict[str, Tensor]  # master / exp_avg / exp_avg_sq shards
    decay_ranges: list[tuple[int, int]]  # shard-local ranges of weight-decayed elements
    ready: set[int] = field(default_factory=set)
    launched: bool = False
    reduce_work: Any = None
    reduce_out: Tensor | None = None
    gather_work: Any = None

    @property
    def shard(self) -> tuple[int, int]:
        size = self.numel // self.world
        return self.rank * size, (self.rank + 1) * size

    @property
    def divisor(self) -> int:
        """What the summed gradient is divided by: the group's ``grad_divisor``, by default the group size (a
        plain average over replicas). Experts under EP set dp: their gradient already sums ep ranks' tokens."""
        return self.group.get("grad_divisor") or self.world
