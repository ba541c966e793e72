"""Pipeline point-to-point transfers that are right under NCCL's rules, not only gloo's.

NCCL has no tags: it matches the sends and receives of a peer pair on a communicator in the order they are
posted. It also runs a communicator's operations one after another on one stream, so a receive posted early
holds up every operation posted after it on that communicator until its data arrives. Two rules follow:

- **One posting order, derived from the schedule.** ``p2p_plan`` lists every transfer of a step. A sender
  posts its transfers as it produces them: a forward's output when the forward ends (inside an overlapped
  pair too), a backward's input gradient when its step ends, so a pair's two outputs leave forward first.
  The receiver posts its receives from that peer in the same order: a receive is posted one step before the
  first step that needs it or any later transfer of that link (so a transfer consumed late may be received
  early, into a buffer of its own). Both sides derive the order from the same schedule; nothing is matched
  by tag.
- **One communicator per direction of each link.** Every transfer goes between adjacent pipeline ranks
  (all three schedules). ``LinkGroups`` makes four groups over a pipeline's ranks: down (r -> r+1) and up
  (r+1 -> r), each split by the parity of r. In each group a rank only sends, or only receives, on a
  single link, so a receive posted ahead never holds up a send (whether NCCL gives a pair its own
  communicator or runs point-to-point traffic on the group's one).

A rank waits only for the receive a step needs, right before using it. ``tests/test_schedules.py`` runs the
plans of every schedule up to pp = 16 through a model of NCCL's matching and stream order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from haillm.parallel.pipeline.schedules import Schedule, StageId, Topology, derive_routes

DOWN, UP = 0, 1


@dataclass(frozen=True)
class Transfer:
    """One tensor sent between two ranks: the output of ``stage``'s forward (``grad`` False) or its input
    gradient (``grad`` True) for ``microbatch``; ``sent_at``/``needed_at``: the sender's step that produces
    it and the receiver's step that consumes it."""

    src: int
    dst: int
    grad: bool
    stage: StageId
    microbatch: int
    sent_at: int
    needed_at: int

    @property
    def key(self) -> tuple[bool, StageId, int]:
        """What identifies the tensor on both sides."""
        return self.grad, self.stage, self.microbatch


def link(src: int, dst: int) -> tuple[int, int]:
    """The (direction, parity) group of the link ``src -> dst`` between adjacent ranks."""
    if abs(src - dst) != 1:
        raise ValueError(f"pipeline transfers go between adjacent ranks, got {src} -> {dst}")
    return (DOWN if dst > src else UP), min(src, dst) % 2


@dataclass
class P2PPlan:
    """For each rank, ``sends[rank]``: its transfers in posting order; ``receives[rank][i]``: the receives to
    post right before its step ``i``, in posting order."""

    sends: list[list[Transfer]]
    receives: list[list[list[Transfer]]]


def p2p_plan(schedule: Schedule, topo: Topology, lookahead: int = 1) -> P2PPlan:
    """The posting order of every rank (see the module docstring). ``lookahead``: how many steps before it
    is needed a receive is posted (so its transfer overlaps the compute before it)."""
    routes = derive_routes(schedule, topo)
    needed: dict[tuple[int, tuple], int] = {}  # (receiver, key) -> its step that consumes the transfer
    for rank, rank_routes in enumerate(routes):
        for i, step_routes in enumerate(rank_routes):
            for r in step_routes:
                if r.src is not None and r.src.rank != rank:
                    needed[(rank, (r.action.kind != "F", topo.stage(r.src.rank, r.src.chunk), r.action.microbatch))] = i
    sends: list[list[Transfer]] = [[] for _ in schedule]
    for rank, rank_routes in enumerate(routes):
        for i, step_routes in enumerate(rank_routes):
            outs = [r for r in step_routes if r.dst is not None and r.dst.rank != rank]
            for r in sorted(outs, key=lambda r: r.action.kind != "F"):  # the forward's output leaves first
                key = (r.action.kind != "F", topo.stage(rank, r.action.chunk), r.action.microbatch)
                sends[rank].append(Transfer(rank, r.dst.rank, *key, i, needed.pop((r.dst.rank, key))))
    if needed:
        raise AssertionError(f"transfers consumed but never produced: {list(needed)[:3]}")
    receives: list[list[list[Transfer]]] = [[[] for _ in steps] for steps in schedule]
    for rank_sends in sends:
        for dst in {t.dst for t in rank_sends}:
            post_at = len(schedule[dst])
            for t in reversed([t for t in rank_sends if t.dst == dst]):  # no later than any later one is needed
                post_at = min(post_at, max(0, t.needed_at - lookahead))
                receives[dst][post_at].insert(0, t)
    for steps in receives:  # one link after the other; each in the sender's order (kept by the insertions)
        for i, posts in enumerate(steps):
            steps[i] = sorted(posts, key=lambda t: t.src)
    return P2PPlan(sends, receives)


class LinkGroups:
    """The four groups carrying one pipeline's transfers (module docstring), for this rank. Create with
    ``LinkGroups.create`` on every rank (group creation is collective)."""

    def __init__(self, groups: dict[tuple[int, int], dist.ProcessGroup | None], pp_rank: int, pp: int):
        self.groups, self.pp_rank, self.pp = groups, pp_rank, pp

    @classmethod
    def create(cls, pipelines: list[list[int]], timeout: timedelta | None = None) -> LinkGroups | None:
        """``pipelines``: the global ranks of every pipeline in pipeline order. None for this rank when pp = 1."""
        me = dist.get_rank()
        pp = len(pipelines[0])
        if pp == 1:
            return None
        mine: dict[tuple[int, int], dist.ProcessGroup | None] = {}
        pp_rank = next(ranks.index(me) for ranks in pipelines if me in ranks)
        for direction in (DOWN, UP):
            for parity in (0, 1) if pp > 2 else (0,):
                for ranks in pipelines:
                    group = dist.new_group(ranks, timeout=timeout)
                    if me in ranks:
                        mine[(direction, parity)] = group
        return cls(mine, pp_rank, pp)

    def group(self, src: int, dst: int) -> dist.ProcessGroup:
        return self.groups[link(src, dst)]

    def all(self) -> list[dist.ProcessGroup]:
        return [g for g in self.groups.values() if g is not None]


class Transfers:
    """Posts one step's sends and receives on their links and hands received tensors over. ``posted`` counts the
    transfers posted so far by (direction, global peer rank), for the watchdog's hang diagnosis; ``plan`` is
    this rank's expected sends, checked as they are posted (the receivers rely on that order)."""

    def __init__(self, links: LinkGroups, posted: Counter[tuple[str, int]], plan: list[Transfer]):
        self.links, self.posted = links, posted
        self.expected = iter(plan)
        self.sent: list[tuple[dist.Work, torch.Tensor, bool]] = []
        self.recvs: dict[tuple[bool, StageId, int], tuple[torch.Tensor, dist.Work]] = {}

    def send(self, tensor: torch.Tensor, key: tuple[bool, StageId, int], peer: int, free: bool) -> None:
        """Post a send (``free``: drop the tensor's storage once it is sent)."""
        want = next(self.expected, None)
        if want is None or want.key != key or want.dst != peer:
            raise RuntimeError(f"pipeline send {key} to rank {peer} out of the planned order (expected {want})")
        group = self.links.group(self.links.pp_rank, peer)
        work = dist.isend(tensor, group=group, group_dst=peer)
        self.posted[("send", dist.get_global_rank(group, peer))] += 1
        self.sent.append((work, tensor, free))
        self.reap()

    def recv(self, transfer: Transfer, buf: torch.Tensor) -> None:
        group = self.links.group(transfer.src, self.links.pp_rank)
        self.recvs[transfer.key] = (buf, dist.irecv(buf, group=group, group_src=transfer.src))
        self.posted[("recv", dist.get_global_rank(group, transfer.src))] += 1

    def take(self, key: tuple[bool, StageId, int]) -> torch.Tensor:
        """Wait for a posted receive and hand its buffer over."""
        buf, work = self.recvs.pop(key)
        work.wait()
        return buf

    def reap(self, wait: bool = False) -> None:
        """Forget completed sends (all of them with ``wait``), freeing the storage of sent activations."""
        still = []
        for work, tensor, free in self.sent:
            if wait:
                work.wait()
            if work.is_completed():
                if free:
                    tensor.untyped_storage().resize_(0)
            else:
                still.append((work, tensor, free))
        self.sent = still

    def finish(self) -> None:
        """End of a step: every send done, nothing left to receive or send."""
        self.reap(wait=True)
        left = next(self.expected, None)
        if self.recvs or left is not None:
            raise RuntimeError(f"pipeline step ended with transfers left: receives {list(self.recvs)}, send {left}")
