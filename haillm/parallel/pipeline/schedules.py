"""Pipeline schedules as data: pure functions from (pp, micro-batches) to per-rank action lists.

A schedule is ``list[list[Step]]``: for each pipeline rank, the compute steps it runs in order. A step is
an :class:`Action` (one chunk's F, B, I or W on one micro-batch) or a :class:`Pair` (an overlapped
forward/backward call). Communication is not stored: :func:`derive_routes` derives it from the actions and
the :class:`Topology` (which pipeline stage each rank's chunk runs), so one runtime and one simulator can
serve every generator here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("F", "B", "I", "W")


@dataclass(frozen=True)
class Action:
    """One compute job of a rank-local chunk on one micro-batch.

    kind: F forward, B full backward, I input-grad-only backward (its weight grad is deferred),
    W the deferred weight grad of an earlier I. Micro-batches are numbered from 0 per chunk.
    """

    kind: str
    chunk: int
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"action kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.microbatch}"


@dataclass(frozen=True)
class Pair:
    """A forward and a backward of different micro-batches run as one overlapped call (F&B)."""

    forward: Action
    backward: Action

    def __post_init__(self) -> None:
        if self.forward.kind != "F" or self.backward.kind not in ("B", "I"):
            raise ValueError(f"a pair holds an F and a B or I, got {self.forward} and {self.backward}")

    def __str__(self) -> str:
        return f"[{self.forward}&{self.backward}]"


Step = Action | Pair
Schedule = list[list[Step]]


def halves(step: Step) -> tuple[Action, ...]:
    """The actions a step runs, forward first (the order the overlap hook starts them in)."""
    return (step.forward, step.backward) if isinstance(step, Pair) else (step,)


def format_rank(rank: int, steps: list[Step]) -> str:
    """One viewer line: ``rank<r>: <step> <step> ...``."""
    return f"rank{rank}: " + " ".join(str(s) for s in steps)


# ---------------------------------------------------------------------------------------------------------
# Topology: which pipeline stage each (rank, chunk) runs.


@dataclass(frozen=True)
class StageId:
    """A stage of one pipeline. ``pipeline`` is 0, or 1 for DualPipe's reverse pipeline (fed at the last
    rank); ``index`` counts from where the data enters and is also the model stage (layer range) it runs."""

    pipeline: int
    index: int


@dataclass(frozen=True)
class Peer:
    """A chunk on a rank: the other end of an activation or gradient hand-off."""

    rank: int
    chunk: int


@dataclass(frozen=True)
class Topology:
    """``chunks[rank][chunk]`` is the stage that chunk runs; every pipeline has ``n_stages`` stages."""

    n_stages: int
    chunks: tuple[tuple[StageId, ...], ...]

    def stage(self, rank: int, chunk: int) -> StageId:
        return self.chunks[rank][chunk]

    def holder(self, stage: StageId) -> Peer:
        for rank, stages in enumerate(self.chunks):
            for chunk, s in enumerate(stages):
                if s == stage:
                    return Peer(rank, chunk)
        raise KeyError(f"no rank holds {stage}")


def topology(name: str, pp: int) -> Topology:
    """Stage placement of a schedule on ``pp`` ranks (DESIGN.md's chunk conventions)."""
    if name == "1f1b":
        return Topology(pp, tuple((StageId(0, r),) for r in range(pp)))
    if name == "dualpipe":
        return Topology(pp, tuple((StageId(0, r), StageId(1, pp - 1 - r)) for r in range(pp)))
    if name == "dualpipev":
        return Topology(2 * pp, tuple((StageId(0, r), StageId(0, 2 * pp - 1 - r)) for r in range(pp)))
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------------------
# Generators.


def _check_pp(name: str, pp: int) -> None:
    if pp < 1:
        raise ValueError(f"{name} needs pp >= 1, got pp={pp}")


def one_f_one_b(pp: int, n_microbatches: int) -> Schedule:
    """Classic 1F1B: rank r warms up with pp-r-1 forwards, alternates F/B, then drains its backwards.

    Fewer micro-batches than ranks is allowed: the warm-up is cut short and the schedule degrades to
    all-forwards-then-all-backwards (still correct, with the same (pp-1)(F+B) bubble and peak min(pp, m)).
    """
    _check_pp("1f1b", pp)
    if n_microbatches < 1:
        raise ValueError(f"1f1b needs at least 1 micro-batch, got {n_microbatches}")
    ranks: Schedule = []
    for r in range(pp):
        warmup = min(pp - r - 1, n_microbatches)
        steps: list[Step] = [Action("F", 0, k) for k in range(warmup)]
        for k in range(n_microbatches - warmup):
            steps += [Action("F", 0, warmup + k), Action("B", 0, k)]
        steps += [Action("B", 0, k) for k in range(n_microbatches - warmup, n_microbatches)]
        ranks.append(steps)
    return ranks


class _Recorder:
    """Records one rank's DualPipe steps in phase terms and maps phases to local chunks.

    Mirrors the reference's bookkeeping: a per-phase counter of forward and backward micro-batches and a
    FIFO of deferred weight grads (one entry per zero-bubble backward, popped by W).
    """

    def __init__(self, flip: bool):
        self.flip = int(flip)
        self.steps: list[Step] = []
        self.next_forward = [0, 0]
        self.next_backward = [0, 0]
        self.deferred: deque[Action] = deque()

    def _forward(self, phase: int) -> Action:
        k = self.next_forward[phase]
        self.next_forward[phase] += 1
        return Action("F", phase ^ self.flip, k)

    def _backward(self, phase: int, zero_bubble: bool) -> Action:
        chunk, k = phase ^ self.flip, self.next_backward[phase]
        self.next_backward[phase] += 1
        if zero_bubble:
            self.deferred.append(Action("W", chunk, k))
        return Action("I" if zero_bubble else "B", chunk, k)

    def forward(self, phase: int) -> None:
        self.steps.append(self._forward(phase))

    def backward(self, phase: int, zero_bubble: bool = False) -> None:
        self.steps.append(self._backward(phase, zero_bubble))

    def weight(self) -> None:
        self.steps.append(self.deferred.popleft())

    def pair(self, forward_phase: int, backward_phase: int) -> None:
        # Weight-grad deferral is off inside overlapped pairs in the reference, so the backward is a full B.
        self.steps.append(Pair(self._forward(forward_phase), self._backward(backward_phase, False)))


def _dualpipe_rank(h: int, n_half: int, per_phase: int, middle: bool, flip: bool) -> list[Step]:
    """The eight steps of DeepSeek's DualPipe.step for a rank at distance ``h`` from its pipeline end.

    ``n_half`` ranks per half, ``per_phase`` micro-batches per direction; ``middle`` ranks run their first
    main-loop F and B unpaired; ``flip`` maps phase p to chunk 1-p (second half of the ranks).
    """
    rec = _Recorder(flip)
    outer = n_half - h - 1  # how far the rank is from the middle
    for _ in range(2 * outer):  # 1: forwards of phase 0 only
        rec.forward(0)
    for _ in range(h + 1):  # 2: forwards of both phases
        rec.forward(0)
        rec.forward(1)
    for _ in range(outer):  # 3: zero-bubble backward, its W at once, a forward
        rec.backward(1, zero_bubble=True)
        rec.weight()
        rec.forward(1)
    for i in range(per_phase - 2 * n_half + h + 1):  # 4: main loop of overlapped pairs
        if i == 0 and middle:
            rec.forward(0)
            rec.backward(1)
        else:
            rec.pair(0, 1)
        rec.pair(1, 0)
    for _ in range(outer):  # 5: backward, then a pair
        rec.backward(1)
        rec.pair(1, 0)
    zero_bubble = False
    for i in range(h + 1):  # 6: backwards of both phases; the second half defers W
        if i == (h + 1) // 2 and h % 2 == 1:
            zero_bubble = True
        rec.backward(1, zero_bubble)
        if i == (h + 1) // 2 and h % 2 == 0:
            zero_bubble = True
        rec.backward(0, zero_bubble)
    for _ in range(outer):  # 7: a W, then a zero-bubble backward
        rec.weight()
        rec.backward(0, zero_bubble=True)
    for _ in range(h + 1):  # 8: drain the remaining Ws
        rec.weight()
    assert not rec.deferred, "DualPipe left weight grads undrained"
    return rec.steps


def dualpipe(pp: int, n_microbatches: int) -> Schedule:
    """DualPipe: two pipelines fed from both ends; ``n_microbatches`` in total, half per direction."""
    if pp < 2 or pp % 2:
        raise ValueError(f"dualpipe needs an even pp >= 2, got pp={pp}")
    if n_microbatches % 2 or n_microbatches < 2 * pp:
        raise ValueError(f"dualpipe needs an even number of micro-batches >= 2*pp={2 * pp}, "
                         f"got {n_microbatches}")
    half = pp // 2
    return [
        _dualpipe_rank(min(r, pp - 1 - r), half, n_microbatches // 2, r in (half - 1, half), r >= half)
        for r in range(pp)
    ]


def dualpipev(pp: int, n_microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half"): one V-shaped pipeline of 2*pp stages, data in and loss out at rank 0."""
    _check_pp("dualpipev", pp)
    if n_microbatches < 2 * pp:
        raise ValueError(f"dualpipev needs micro-batches >= 2*pp={2 * pp}, got {n_microbatches}")
    return [_dualpipe_rank(r, pp, n_microbatches, r == pp - 1, False) for r in range(pp)]


SCHEDULES = {"1f1b": one_f_one_b, "dualpipe": dualpipe, "dualpipev": dualpipev}


def build(name: str, pp: int, n_microbatches: int) -> tuple[Schedule, Topology]:
    """The schedule ``name`` and its stage placement."""
    topo = topology(name, pp)
    return SCHEDULES[name](pp, n_microbatches), topo


# ---------------------------------------------------------------------------------------------------------
# Derived facts: communication and activation memory.


@dataclass(frozen=True)
class Route:
    """Where one compute half gets its input and where its output goes.

    For F: ``src`` produced the input activation (None: this is the first stage, read the micro-batch);
    ``dst`` consumes the output (None: last stage, compute the loss here). For B/I: ``src`` produced the
    output gradient (None: last stage, start from the loss); ``dst`` receives the input gradient (None:
    first stage, nothing to send). A peer on the same rank is a local hand-off (DualPipeV's turn).
    """

    action: Action
    src: Peer | None
    dst: Peer | None


def derive_routes(schedule: Schedule, topo: Topology) -> list[list[tuple[Route, ...]]]:
    """Routes parallel to ``schedule``: one per F/B/I half of each step, none for W."""

    def neighbour(stage: StageId, offset: int) -> Peer | None:
        index = stage.index + offset
        return topo.holder(StageId(stage.pipeline, index)) if 0 <= index < topo.n_stages else None

    out = []
    for rank, steps in enumerate(schedule):
        rank_routes = []
        for step in steps:
            routes = []
            for a in halves(step):
                if a.kind == "W":
                    continue
                stage = topo.stage(rank, a.chunk)
                before, after = neighbour(stage, -1), neighbour(stage, +1)
                routes.append(Route(a, before, after) if a.kind == "F" else Route(a, after, before))
            rank_routes.append(tuple(routes))
        out.append(rank_routes)
    return out


@dataclass(frozen=True)
class Message:
    """One point-to-point tensor transfer between two different ranks."""

    src: int
    dst: int
    grad: bool  # False: an activation (forward), True: a gradient (backward)
    stage: StageId  # the stage that produced it
    microbatch: int


def p2p_messages(schedule: Schedule, topo: Topology) -> tuple[list[list[Message]], list[list[Message]]]:
    """(sends, receives) per rank, each in the order the rank's steps produce or consume them.

    Within a step the forward half comes first. Local hand-offs are left out.
    """
    sends: list[list[Message]] = [[] for _ in schedule]
    recvs: list[list[Message]] = [[] for _ in schedule]
    for rank, rank_routes in enumerate(derive_routes(schedule, topo)):
        for routes in rank_routes:
            for route in routes:
                a, grad = route.action, route.action.kind != "F"
                if route.src is not None and route.src.rank != rank:
                    produced_by = topo.stage(route.src.rank, route.src.chunk)
                    recvs[rank].append(Message(route.src.rank, rank, grad, produced_by, a.microbatch))
                if route.dst is not None and route.dst.rank != rank:
                    own_stage = topo.stage(rank, a.chunk)
                    sends[rank].append(Message(rank, route.dst.rank, grad, own_stage, a.microbatch))
    return sends, recvs


def peak_activations(steps: list[Step], sizes: Sequence[float] | None = None) -> float:
    """Most forwards of one rank whose backward (B or I) has not run yet, counted per (chunk, micro-batch).

    The unit is one chunk's activations for one micro-batch, or ``sizes[chunk]`` when given (e.g. the bytes
    a chunk keeps per micro-batch). A pair's forward counts before its backward frees anything (the hook
    starts the forward first). I frees the activation; the inputs W still needs are not counted.
    """
    live = peak = 0
    for step in steps:
        for a in halves(step):
            size = 1 if sizes is None else sizes[a.chunk]
            if a.kind == "F":
                live += size
                peak = max(peak, live)
            elif a.kind in ("B", "I"):
                live -= size
    return peak
