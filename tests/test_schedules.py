"""Schedules as data: golden DualPipe op order, invariants over many sizes, routes, the viewer's text."""

import subprocess
import sys
from collections import Counter

import pytest

from haillm.parallel.pipeline import (
    Action,
    Pair,
    Peer,
    Route,
    StageId,
    build,
    derive_routes,
    dualpipe,
    dualpipev,
    halves,
    one_f_one_b,
    p2p_messages,
    peak_activations,
    topology,
)
from haillm.tools.schedule import main

# Golden op order of DeepSeek's DualPipe.step for 4 ranks and num_chunks=8: ../shared/REFERENCE.md §1.2
# (deepseek-ai/DualPipe @ 3da1bbe), in DESIGN.md notation (the reference's `B1.0(in)` is written `I1.0`).
GOLDEN_DUALPIPE_PP4_M8 = [
    "rank0: F0.0 F0.1 F0.2 F1.0 I1.0 W1.0 F1.1 [F0.3&B1.1] [F1.2&B0.0] B1.2 [F1.3&B0.1] B1.3 I0.2 W0.2 I0.3 W0.3",  # noqa: E501
    "rank1: F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 [F1.2&B0.0] [F0.3&B1.1] [F1.3&B0.1] B1.2 B0.2 I1.3 I0.3 W1.3 W0.3",
    "rank2: F1.0 F0.0 F1.1 F0.1 F1.2 B0.0 [F0.2&B1.0] [F1.3&B0.1] [F0.3&B1.1] B0.2 B1.2 I0.3 I1.3 W0.3 W1.3",
    "rank3: F1.0 F1.1 F1.2 F0.0 I0.0 W0.0 F0.1 [F1.3&B0.1] [F0.2&B1.0] B0.2 [F0.3&B1.1] B0.3 I1.2 W1.2 I1.3 W1.3",  # noqa: E501
]

SIZES = {
    "1f1b": [(pp, m) for pp in (1, 2, 3, 4, 5, 8) for m in (1, 2, pp, pp + 3, 3 * pp)],
    "dualpipe": [(pp, m) for pp in (2, 4, 6, 8, 16) for m in (2 * pp, 2 * pp + 2, 4 * pp, 6 * pp)],
    "dualpipev": [(pp, m) for pp in (1, 2, 3, 4, 8) for m in (2 * pp, 2 * pp + 1, 4 * pp, 6 * pp + 3)],
}
CASES = [(name, pp, m) for name, sizes in SIZES.items() for pp, m in sizes]


def test_dualpipe_matches_reference_op_order():
    lines = [f"rank{r}: " + " ".join(map(str, steps)) for r, steps in enumerate(dualpipe(4, 8))]
    assert lines == GOLDEN_DUALPIPE_PP4_M8


def test_viewer_prints_golden(capsys):
    assert main(["--schedule", "dualpipe", "--pp", "4", "--microbatches", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == GOLDEN_DUALPIPE_PP4_M8


def test_viewer_runs_as_module():
    cmd = [sys.executable, "-m", "haillm.tools.schedule", "--schedule", "dualpipe", "--pp", "4",
           "--microbatches", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == GOLDEN_DUALPIPE_PP4_M8


def test_viewer_1f1b_format(capsys):
    main(["--schedule", "1f1b", "--pp", "2", "--microbatches", "3"])
    assert capsys.readouterr().out.splitlines() == [
        "rank0: F0.0 F0.1 B0.0 F0.2 B0.1 B0.2",
        "rank1: F0.0 B0.0 F0.1 B0.1 F0.2 B0.2",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--schedule", "dualpipe", "--pp", "3", "--microbatches", "12"],  # odd pp
        ["--schedule", "dualpipe", "--pp", "4", "--microbatches", "6"],  # too few micro-batches
        ["--schedule", "dualpipe", "--pp", "4", "--microbatches", "9"],  # odd micro-batches
        ["--schedule", "dualpipev", "--pp", "4", "--microbatches", "7"],
        ["--schedule", "1f1b", "--pp", "0", "--microbatches", "4"],
        ["--schedule", "1f1b", "--pp", "2", "--microbatches", "0"],
        ["--schedule", "gpipe", "--pp", "2", "--microbatches", "4"],
        ["--schedule", "1f1b", "--pp", "two", "--microbatches", "4"],
        ["--schedule", "1f1b", "--microbatches", "4"],
        ["--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--simulate", "--cost", "F=1,X=2"],
        ["--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--simulate", "--cost", "W=3"],  # I<0
    ],
)
def test_viewer_bad_arguments_one_line_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "error:" in captured.err


@pytest.mark.parametrize(
    "fn, pp, m, message",
    [
        (dualpipe, 3, 12, "even pp"),
        (dualpipe, 0, 12, "even pp"),
        (dualpipe, 4, 6, "micro-batches >= 2\\*pp=8"),
        (dualpipe, 4, 10 + 1, "even number of micro-batches"),
        (dualpipev, 3, 5, "micro-batches >= 2\\*pp=6"),
        (dualpipev, 0, 4, "pp >= 1"),
        (one_f_one_b, 2, 0, "at least 1 micro-batch"),
    ],
)
def test_preconditions(fn, pp, m, message):
    with pytest.raises(ValueError, match=message) as exc:
        fn(pp, m)
    assert "\n" not in str(exc.value)


def test_dualpipev_is_first_half_of_dualpipe():
    for n in range(1, 9):
        for c in range(2 * n, 6 * n + 1):
            assert dualpipev(n, c) == dualpipe(2 * n, 2 * c)[:n], (n, c)


def _per_chunk(name: str, m: int) -> tuple[int, int]:
    """(chunks per rank, micro-batches per chunk)."""
    return {"1f1b": (1, m), "dualpipe": (2, m // 2), "dualpipev": (2, m)}[name]


@pytest.mark.parametrize("name, pp, m", CASES)
def test_each_chunk_runs_every_microbatch_once_and_w_drains(name, pp, m):
    schedule, _ = build(name, pp, m)
    n_chunks, per_chunk = _per_chunk(name, m)
    expected = Counter((c, k) for c in range(n_chunks) for k in range(per_chunk))
    assert len(schedule) == pp
    for steps in schedule:
        actions = [a for s in steps for a in halves(s)]
        assert Counter((a.chunk, a.microbatch) for a in actions if a.kind == "F") == expected
        assert Counter((a.chunk, a.microbatch) for a in actions if a.kind in ("B", "I")) == expected
        seen_forward, deferred = set(), set()
        for a in actions:
            key = (a.chunk, a.microbatch)
            if a.kind == "F":
                seen_forward.add(key)
            elif a.kind in ("B", "I"):
                assert key in seen_forward, f"backward before forward: {a}"
                if a.kind == "I":
                    deferred.add(key)
            else:
                deferred.remove(key)  # a W only ever follows its own I, once
        assert not deferred, f"W queue not drained: {deferred}"


@pytest.mark.parametrize("name, pp, m", CASES)
def test_peak_in_flight_activations(name, pp, m):
    """Unit: one chunk's activations for one micro-batch. REFERENCE §1.4: DualPipe PP+1, 1F1B PP."""
    schedule, _ = build(name, pp, m)
    peaks = [peak_activations(steps) for steps in schedule]
    if name == "1f1b":
        assert peaks == [min(pp - r, m) for r in range(pp)]
    elif name == "dualpipe":
        assert peaks == [pp + 1] * pp
    else:  # 2*pp stages of half the size: PP+1 with PP the number of stages
        assert peaks == [2 * pp + 1] * pp


def test_overlapped_pairs_never_defer_weight_grads():
    for name, pp, m in CASES:
        for steps in build(name, pp, m)[0]:
            assert all(s.backward.kind == "B" for s in steps if isinstance(s, Pair))


def test_topology_conventions():
    assert topology("dualpipe", 4).chunks[1] == (StageId(0, 1), StageId(1, 2))
    assert topology("dualpipev", 4).chunks[1] == (StageId(0, 1), StageId(0, 6))
    assert topology("dualpipev", 4).n_stages == 8
    assert topology("1f1b", 3).holder(StageId(0, 2)) == Peer(2, 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        topology("gpipe", 2)


def test_routes_small_dualpipe():
    schedule, topo = build("dualpipe", 2, 4)
    routes = derive_routes(schedule, topo)
    by_action = {(r, rt.action): rt for r, rts in enumerate(routes) for step_rts in rts for rt in step_rts}
    # rank 0: chunk 0 is stage 0 of the pipeline fed at rank 0; chunk 1 is the last stage of the other one.
    assert by_action[(0, Action("F", 0, 1))] == Route(Action("F", 0, 1), None, Peer(1, 0))
    assert by_action[(0, Action("F", 1, 1))] == Route(Action("F", 1, 1), Peer(1, 1), None)
    assert by_action[(0, Action("B", 1, 1))] == Route(Action("B", 1, 1), None, Peer(1, 1))
    assert by_action[(1, Action("B", 0, 0))] == Route(Action("B", 0, 0), None, Peer(0, 0))
    for steps, rank_routes in zip(schedule, routes, strict=True):  # W has no route, a pair has two
        computed = [sum(a.kind != "W" for a in halves(s)) for s in steps]
        assert [len(rts) for rts in rank_routes] == computed


def test_routes_dualpipev_turn_is_local():
    schedule, topo = build("dualpipev", 2, 4)
    routes = [rt for rts in derive_routes(schedule, topo)[1] for rt in rts]
    assert Route(Action("F", 0, 0), Peer(0, 0), Peer(1, 1)) in routes
    assert Route(Action("B", 1, 0), Peer(0, 1), Peer(1, 0)) in routes
    sends, _ = p2p_messages(schedule, topo)
    assert all(msg.dst != msg.src for rank_sends in sends for msg in rank_sends)


@pytest.mark.parametrize("name, pp, m", CASES)
def test_every_send_has_a_matching_receive(name, pp, m):
    schedule, topo = build(name, pp, m)
    sends, recvs = p2p_messages(schedule, topo)
    assert Counter(x for r in sends for x in r) == Counter(x for r in recvs for x in r)
    # Per link and kind, messages are consumed in the order they are produced (across kinds they are not:
    # docs/pipeline.md; the posting plan of tests/test_p2p_plan.py orders both kinds on one link).
    for src in range(pp):
        for dst in range(pp):
            for grad in (False, True):
                sent = [x for x in sends[src] if x.dst == dst and x.grad == grad]
                received = [x for x in recvs[dst] if x.src == src and x.grad == grad]
                assert sent == received
