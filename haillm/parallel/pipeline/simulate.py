"""Discrete-event cost model of any schedule: makespan, per-rank bubble, peak activations, timeline plot.

Model: each rank runs its steps in order; a step starts when its rank is free and its inputs exist. A
forward of stage s needs stage s-1's forward of the same micro-batch; a backward (B or I) needs stage s+1's
backward, or its own forward on the last stage; W needs its I. A pair needs both halves' inputs, costs FB,
and both halves finish when it ends. A transfer between different ranks adds ``p2p`` latency.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from haillm.parallel.pipeline.schedules import Action, Pair, Schedule, StageId, Step, Topology, halves
from haillm.parallel.pipeline.schedules import peak_activations as _peak


@dataclass(frozen=True)
class Costs:
    """Time of each kind of step. ``i`` (input-grad-only backward) defaults to b - w."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float = 2.5
    i: float | None = None
    p2p: float = 0.0

    def __post_init__(self) -> None:
        values = {"F": self.f, "B": self.b, "W": self.w, "I": self.input_grad, "FB": self.fb, "P2P": self.p2p}
        negative = [f"{k}={v:g}" for k, v in values.items() if v < 0]
        if negative:
            raise ValueError(f"costs must be >= 0 (I defaults to B-W), got {', '.join(negative)}")

    @property
    def input_grad(self) -> float:
        return self.b - self.w if self.i is None else self.i

    def of(self, step: Step) -> float:
        if isinstance(step, Pair):
            return self.fb
        return {"F": self.f, "B": self.b, "I": self.input_grad, "W": self.w}[step.kind]

    @classmethod
    def parse(cls, text: str) -> Costs:
        """``"F=1,B=2,W=1,FB=2.5"`` (keys F, B, W, I, FB or F&B, P2P; case-insensitive)."""
        names = {f.name for f in fields(cls)}
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().lower().replace("&", "")
            if not sep or key not in names:
                raise ValueError(f"bad cost {item!r}: expected KEY=VALUE with KEY in F, B, W, I, FB, P2P")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"bad cost {item!r}: {value!r} is not a number") from None
        return cls(**values)


@dataclass(frozen=True)
class Span:
    """A step placed in time on its rank."""

    step: Step
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """Result of :func:`simulate`. ``idle[r]`` = makespan - busy[r]: the rank's bubble, counting the time
    before its first step and after its last one. ``bubble`` is the largest idle over ranks."""

    spans: list[list[Span]]
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_activations: list[int]

    @property
    def bubble(self) -> float:
        return max(self.idle)


def simulate(schedule: Schedule, topo: Topology, costs: Costs | None = None) -> Simulation:
    """Place every step of ``schedule`` in time; raises ValueError if the schedule deadlocks."""
    costs = costs or Costs()
    finished: dict[tuple[str, StageId, int], tuple[float, int]] = {}  # (F|B|W, stage, mb) -> (time, rank)
    spans: list[list[Span]] = [[] for _ in schedule]
    clock = [0.0] * len(schedule)

    def needs(rank: int, a: Action) -> list[tuple[str, StageId, int]]:
        stage = topo.stage(rank, a.chunk)
        if a.kind == "F":
            return [("F", StageId(stage.pipeline, stage.index - 1), a.microbatch)] if stage.index else []
        if a.kind == "W":
            return [("B", stage, a.microbatch)]
        if stage.index == topo.n_stages - 1:
            return [("F", stage, a.microbatch)]
        return [("F", stage, a.microbatch), ("B", StageId(stage.pipeline, stage.index + 1), a.microbatch)]

    def ready_time(rank: int, step: Step) -> float | None:
        t = clock[rank]
        for a in halves(step):
            for key in needs(rank, a):
                if key not in finished:
                    return None
                done, src = finished[key]
                t = max(t, done + (costs.p2p if src != rank else 0.0))
        return t

    progress = True
    while progress:
        progress = False
        for rank, steps in enumerate(schedule):
            while len(spans[rank]) < len(steps):
                step = steps[len(spans[rank])]
                start = ready_time(rank, step)
                if start is None:
                    break
                end = clock[rank] = start + costs.of(step)
                spans[rank].append(Span(step, start, end))
                for a in halves(step):
                    kind = "F" if a.kind == "F" else "B" if a.kind in ("B", "I") else "W"
                    finished[(kind, topo.stage(rank, a.chunk), a.microbatch)] = (end, rank)
                progress = True
    stuck = [f"rank{r} at {steps[len(spans[r])]}" for r, steps in enumerate(schedule)
             if len(spans[r]) < len(steps)]
    if stuck:
        raise ValueError("schedule deadlocks: " + ", ".join(stuck))
    makespan = max((s[-1].end for s in spans if s), default=0.0)
    busy = [sum(s.end - s.start for s in rank_spans) for rank_spans in spans]
    return Simulation(spans, makespan, busy, [makespan - b for b in busy], [_peak(s) for s in schedule])


_COLORS = {"F": ("#4c9be8", "#a9cdf3"), "B": ("#4caf50", "#a5d6a7"), "I": ("#f4a340", "#f9d19c"),
           "W": ("#9e9e9e", "#d0d0d0")}


def plot_timeline(sim: Simulation, path: str, title: str | None = None) -> None:
    """Draw one row per rank, a box per step coloured by kind (lighter for chunk 1), labelled with the
    micro-batch; a pair is one box split into its forward (top) and backward (bottom) half."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    n_ranks = len(sim.spans)
    fig = Figure(figsize=(max(6.0, sim.makespan * 0.25), 0.5 * n_ranks + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for rank, spans in enumerate(sim.spans):
        y = n_ranks - 1 - rank
        for span in spans:
            parts = halves(span.step)
            height = 0.8 / len(parts)
            for j, a in enumerate(parts):
                bottom = y + 0.4 - (j + 1) * height
                colour = _COLORS[a.kind][a.chunk % 2]
                ax.add_patch(Rectangle((span.start, bottom), span.end - span.start, height,
                                       facecolor=colour, edgecolor="black", linewidth=0.5))
                ax.text((span.start + span.end) / 2, bottom + height / 2, str(a.microbatch),
                        ha="center", va="center", fontsize=6)
    ax.set_xlim(0, sim.makespan)
    ax.set_ylim(-0.6, n_ranks - 0.4)
    ax.set_yticks(range(n_ranks), [f"rank{r}" for r in reversed(range(n_ranks))])
    ax.set_xlabel("time (lighter colour: chunk 1)")
    ax.set_title(title or f"makespan {sim.makespan:g}, bubble {sim.bubble:g}")
    ax.legend(handles=[Patch(facecolor=c[0], edgecolor="black", label=k) for k, c in _COLORS.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
