"""Pipeline parallelism: schedules as data, their cost model, the runtime that executes them (runtime.py,
with overlapped F&B pairs in overlap.py) and the DeepSeek-V3 stage split (stage.py)."""

from haillm.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    Message,
    Pair,
    Peer,
    Route,
    Schedule,
    StageId,
    Step,
    Topology,
    build,
    derive_routes,
    dualpipe,
    dualpipev,
    format_rank,
    halves,
    one_f_one_b,
    p2p_messages,
    peak_activations,
    topology,
)
from haillm.parallel.pipeline.simulate import Costs, Simulation, Span, plot_timeline, simulate

__all__ = [
    "SCHEDULES", "Action", "Costs", "Message", "Pair", "Peer", "Route", "Schedule", "Simulation", "Span",
    "StageId", "Step", "Topology", "build", "derive_routes", "dualpipe", "dualpipev", "format_rank", "halves",
    "one_f_one_b", "p2p_messages", "peak_activations", "plot_timeline", "simulate", "topology",
]
