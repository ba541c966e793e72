"""Cost model: hand-computed timelines, the published bubble table, and the viewer's --simulate output."""

import pytest

from haillm.parallel.pipeline import Action, Costs, Pair, build, plot_timeline, simulate, topology
from haillm.tools.schedule import main

F, B, W, FB = 1.0, 2.0, 1.0, 2.5
COSTS = Costs(f=F, b=B, w=W, fb=FB)


def _times(sim, rank):
    return [(str(s.step), s.start, s.end) for s in sim.spans[rank]]


def test_1f1b_two_ranks_by_hand():
    sim = simulate(*build("1f1b", 2, 2), COSTS)
    assert _times(sim, 0) == [("F0.0", 0, 1), ("F0.1", 1, 2), ("B0.0", 4, 6), ("B0.1", 7, 9)]
    assert _times(sim, 1) == [("F0.0", 1, 2), ("B0.0", 2, 4), ("F0.1", 4, 5), ("B0.1", 5, 7)]
    assert sim.makespan == 9 and sim.busy == [6, 6] and sim.idle == [3, 3] and sim.bubble == 3


def test_p2p_latency_only_between_ranks():
    sim = simulate(*build("1f1b", 2, 1), Costs(f=F, b=B, p2p=0.5))
    assert _times(sim, 0) == [("F0.0", 0, 1), ("B0.0", 5, 7)]
    assert _times(sim, 1) == [("F0.0", 1.5, 2.5), ("B0.0", 2.5, 4.5)]
    sim = simulate(*build("dualpipev", 1, 2), Costs(p2p=5))  # one rank: the V turn is local
    assert sim.makespan == sim.busy[0]


def test_pair_and_zero_bubble_costs():
    topo = topology("dualpipev", 1)  # one rank, stages 0 and 1
    f, i, w, b = (lambda c, k, kind=kind: Action(kind, c, k) for kind in "FIWB")
    schedule = [[f(0, 0), f(1, 0), f(0, 1), i(1, 0), w(1, 0), Pair(f(1, 1), b(0, 0)), b(1, 1), b(0, 1)]]
    sim = simulate(schedule, topo, Costs(f=1, b=3, w=1, fb=3.5))
    ends = [s.end for s in sim.spans[0]]
    assert ends == [1, 2, 3, 5, 6, 9.5, 12.5, 15.5]  # I costs B-W = 2; the pair costs FB
    assert Costs(i=0.5).input_grad == 0.5


def test_deadlock_is_an_error():
    topo = topology("1f1b", 2)
    with pytest.raises(ValueError, match="deadlocks: rank0 at B0.0, rank1 at B0.0"):
        simulate([[Action("F", 0, 0), Action("B", 0, 0)], [Action("B", 0, 0), Action("F", 0, 0)]], topo)


def test_costs_parse():
    assert Costs.parse("F=1,B=2,W=1,FB=2.5") == Costs(1, 2, 1, 2.5)
    assert Costs.parse("f=2, F&B=3, I=0.5, P2P=0.1") == Costs(f=2, fb=3, i=0.5, p2p=0.1)
    for bad in ("F", "X=1", "F=one", "B=1,W=2"):
        with pytest.raises(ValueError):
            Costs.parse(bad)


# The bubble is each rank's idle time: makespan minus the time it spends computing (so it includes the
# wait before its first step and after its last), and the table reports the largest over ranks. Published
# formulas: REFERENCE §1.4 (DualPipe README), PP = pipeline stages; DualPipeV runs them on PP/2 ranks.
def _published(name, stages):
    return (stages - 1) * (F + B) if name == "1f1b" else (stages / 2 - 1) * (FB + B - 3 * W)


# (schedule, PP stages) -> (simulated bubble, makespan); written to docs/pipeline.md. Every rank runs 4*PP
# chunk steps: 4*PP micro-batches for 1F1B and DualPipe, 2*PP for DualPipeV (each passes both its chunks).
TABLE = {
    ("1f1b", 4): (9.0, 57.0), ("1f1b", 8): (21.0, 117.0), ("1f1b", 16): (45.0, 237.0),
    ("dualpipe", 4): (1.5, 44.0), ("dualpipe", 8): (4.5, 89.0), ("dualpipe", 16): (10.5, 179.0),
    ("dualpipev", 4): (1.5, 44.0), ("dualpipev", 8): (4.5, 89.0), ("dualpipev", 16): (10.5, 179.0),
}


@pytest.mark.parametrize("name, stages", sorted(TABLE))
def test_bubble_table(name, stages):
    ranks = stages // 2 if name == "dualpipev" else stages
    sim = simulate(*build(name, ranks, 2 * stages if name == "dualpipev" else 4 * stages), COSTS)
    assert (sim.bubble, sim.makespan) == TABLE[(name, stages)]
    assert sim.bubble == _published(name, stages)


@pytest.mark.parametrize("name", ["1f1b", "dualpipe"])
@pytest.mark.parametrize("stages", [4, 8])
def test_bubble_does_not_grow_with_microbatches(name, stages):
    for m in (2 * stages, 2 * stages + 2, 6 * stages):
        assert simulate(*build(name, stages, m), COSTS).bubble == _published(name, stages)


def test_viewer_simulate_output(capsys):
    assert main(["--schedule", "dualpipe", "--pp", "4", "--microbatches", "8", "--simulate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 + 6 and all(line.startswith(f"rank{r}: F") for r, line in enumerate(lines[:4]))
    assert lines[4:] == [
        "sim costs: F=1 B=2 W=1 I=1 FB=2.5 P2P=0",
        *[f"sim rank{r}: busy=22.5 idle=1.5 peak_activations=5" for r in range(4)],
        "sim makespan=24 bubble=1.5",
    ]


def test_viewer_cost_and_plot(tmp_path, capsys):
    png = tmp_path / "timeline.png"
    args = ["--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--simulate", "--cost", "F=2,B=4"]
    assert main([*args, "--plot", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "sim makespan=66 bubble=18"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_timeline_pairs(tmp_path):
    path = tmp_path / "dualpipe.png"
    plot_timeline(simulate(*build("dualpipe", 4, 8)), str(path))
    assert path.stat().st_size > 1000
