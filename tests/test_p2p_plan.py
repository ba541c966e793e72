"""The pipeline's posting plan under NCCL's rules, for every schedule up to pp = 16, without processes.

NCCL matches a peer pair's transfers on a communicator by posting order (no tags) and runs a communicator's
operations in order on one stream. The plan must make both sides post each link's transfers in one order,
and the ranks' programs (post the step's receives, wait for the inputs, post the outputs, drain at the end)
must complete under that stream model with the link groups of ``haillm.parallel.pipeline.p2p``.
"""

from collections import defaultdict, deque

import pytest

from haillm.parallel.pipeline import build, derive_routes, halves
from haillm.parallel.pipeline.p2p import Transfer, link, p2p_plan

SIZES = {
    "1f1b": [(pp, m) for pp in (2, 3, 4, 8, 16) for m in (1, 2, pp, pp + 3, 3 * pp)],
    "dualpipe": [(pp, m) for pp in (2, 4, 8, 16) for m in (2 * pp, 2 * pp + 2, 4 * pp, 6 * pp)],
    "dualpipev": [(pp, m) for pp in (2, 3, 4, 8, 16) for m in (2 * pp, 2 * pp + 1, 4 * pp, 6 * pp + 3)],
}
CASES = [(name, pp, m) for name, sizes in SIZES.items() for pp, m in sizes]


def production_order(name: str, pp: int, m: int) -> list[list[tuple]]:
    """What each rank sends, in the order the runtime posts it, from the schedule alone: step by step, a
    forward's output when the forward ends, a backward's input gradient when its step ends."""
    schedule, topo = build(name, pp, m)
    out = []
    for rank, rank_routes in enumerate(derive_routes(schedule, topo)):
        sends = []
        for routes in rank_routes:
            forward = [r for r in routes if r.action.kind == "F"]
            for r in forward + [r for r in routes if r.action.kind != "F"]:
                if r.dst is not None and r.dst.rank != rank:
                    sends.append((r.dst.rank, r.action.kind != "F", topo.stage(rank, r.action.chunk),
                                  r.action.microbatch))
        out.append(sends)
    return out


@pytest.mark.parametrize("name, pp, m", CASES)
def test_both_ends_of_every_link_post_in_one_order(name, pp, m):
    schedule, topo = build(name, pp, m)
    plan = p2p_plan(schedule, topo)
    assert [[(t.dst, *t.key) for t in sends] for sends in plan.sends] == production_order(name, pp, m)
    for src in range(pp):
        for dst in range(pp):
            sent = [t for t in plan.sends[src] if t.dst == dst]
            received = [t for steps in plan.receives[dst] for t in steps if t.src == src]
            assert sent == received, (src, dst)
    for rank, steps in enumerate(plan.receives):
        for i, posts in enumerate(steps):
            assert all(t.dst == rank and i <= t.needed_at for t in posts)  # posted before it is needed
    # the runtime waits for each transfer at the step that consumes it: its kind and stage say which
    for t in (t for sends in plan.sends for t in sends):
        assert any(a.microbatch == t.microbatch and (a.kind != "F") == t.grad
                   for a in halves(schedule[t.dst][t.needed_at]) if a.kind != "W"), t


def run_programs(name: str, pp: int, m: int, stream_of) -> str | None:
    """Every rank's host program under NCCL's model; None when all complete, else the ranks' blocked events.

    Host: before step i post its receives, wait for the transfers step i consumes, then post step i's sends;
    at the end wait for every send. Device: ``stream_of(rank, transfer)`` names the stream an operation runs
    on; a stream runs its operations in order, and the k-th send of a link completes together with the k-th
    receive, once both are at the head of their streams."""
    schedule, topo = build(name, pp, m)
    plan = p2p_plan(schedule, topo)
    needed: dict[int, dict[int, list[Transfer]]] = defaultdict(lambda: defaultdict(list))
    for t in (t for sends in plan.sends for t in sends):
        needed[t.dst][t.needed_at].append(t)
    programs = []
    for rank, steps in enumerate(schedule):
        events: list[tuple] = []
        for i in range(len(steps)):
            events += [("post", "recv", t) for t in plan.receives[rank][i]]
            events += [("wait", t) for t in needed[rank][i]]
            events += [("post", "send", t) for t in plan.sends[rank] if t.sent_at == i]
        events.append(("drain",))
        programs.append(events)
    pc = [0] * pp
    streams: dict[tuple, deque] = defaultdict(deque)  # (rank, stream) -> operations not yet complete
    posted: dict[tuple, list[Transfer]] = defaultdict(list)  # (src, dst, kind) -> posting order
    position: dict[tuple, int] = {}  # (kind, transfer) -> its index in its link's posting order
    done: set[tuple] = set()
    sends_left = [len(plan.sends[r]) for r in range(pp)]
    while True:
        progress = False
        for rank in range(pp):
            while pc[rank] < len(programs[rank]):
                event = programs[rank][pc[rank]]
                if event[0] == "post":
                    _, kind, t = event
                    streams[(rank, stream_of(rank, t))].append((kind, t))
                    order = posted[(t.src, t.dst, kind)]
                    position[(kind, t)] = len(order)
                    order.append(t)
                elif event[0] == "wait" and ("recv", event[1]) not in done:
                    break
                elif event[0] == "drain" and sends_left[rank]:
                    break
                pc[rank] += 1
                progress = True
        for ops in list(streams.values()):
            if not ops:
                continue
            kind, t = ops[0]
            other = "recv" if kind == "send" else "send"
            peer = t.dst if kind == "send" else t.src
            counterpart = posted[(t.src, t.dst, other)]
            k = position[(kind, t)]
            if k < len(counterpart) and counterpart[k] != t:
                return f"link {t.src}->{t.dst}: transfer {k} posted as {t} by one side, {counterpart[k]} by the other"
            peer_ops = streams[(peer, stream_of(peer, t))]
            if peer_ops and peer_ops[0] == (other, t):
                ops.popleft()
                peer_ops.popleft()
                done.update({("send", t), ("recv", t)})
                sends_left[t.src] -= 1
                progress = True
        if all(pc[r] == len(programs[r]) for r in range(pp)):
            return None
        if not progress:
            return "; ".join(f"rank {r} at {programs[r][pc[r]][:2]}" for r in range(pp) if pc[r] < len(programs[r]))


def links_stream(rank: int, t: Transfer) -> tuple[int, int]:
    """The runtime's groups: one per direction and parity of each link (a rank has one link in each)."""
    return link(t.src, t.dst)


@pytest.mark.parametrize("name, pp, m", CASES)
def test_plan_completes_under_nccl_stream_order(name, pp, m):
    assert run_programs(name, pp, m, links_stream) is None


@pytest.mark.parametrize("name", SIZES)
def test_one_stream_per_rank_would_hang(name):
    """Why the link groups: with every transfer on one communicator (one stream per rank), a receive posted a
    step ahead holds up the sends behind it, and the programs deadlock."""
    pp, m = SIZES[name][-1]
    blocked = run_programs(name, pp, m, lambda rank, t: 0)
    assert blocked is not None and "rank" in blocked
