"""ParallelDims: validation messages, rank arithmetic and the groups it builds on 4 and 8 gloo ranks."""

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed

from haillm.parallel.mesh import ParallelConfigError, ParallelDims


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dp=2, pp=2, world_size=2), "parallel.dp*pp*cp*tp = 4 (dp=2, pp=2, cp=1, tp=1) but world size is 2"),
        (dict(dp=2, cp=0, world_size=2), "parallel.cp must be an integer >= 1, got 0"),
        (dict(dp=4, ep=3, world_size=4), "parallel.ep=3 must divide parallel.dp=4"),
        (dict(dp=0, world_size=1), "parallel.dp must be an integer >= 1, got 0"),
        (dict(ranks_per_node=0), "parallel.ranks_per_node must be an integer >= 1"),
    ],
)
def test_validation_is_one_clear_line(kwargs, message):
    with pytest.raises(ParallelConfigError) as err:
        ParallelDims(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_one_without_distributed():
    dims = ParallelDims().build()
    assert dims.dp_group is None and dims.ep_group is None
    assert (dims.dp_rank, dims.pp_rank, dims.ep_rank, dims.is_rank0, dims.is_last_pp_stage) == (
        0,
        0,
        0,
        True,
        True,
    )


def reference_coords(dp, pp, tp, ep, rank, cp=1):
    """Enumerate the documented layout literally: rank = (((pp*edp + edp_r)*ep + ep_r)*cp + cp_r)*tp + tp_r."""
    edp = dp // ep
    table = {}
    for p in range(pp):
        for e in range(edp):
            for x in range(ep):
                for c in range(cp):
                    for t in range(tp):
                        table[(((p * edp + e) * ep + x) * cp + c) * tp + t] = dict(pp=p, edp=e, ep=x, cp=c, tp=t,
                                                                                   dp=e * ep + x)
    return table[rank]


@pytest.mark.parametrize("dp,pp,tp,ep,cp", [(8, 1, 1, 2, 1), (2, 2, 2, 1, 1), (4, 2, 1, 2, 1), (2, 1, 4, 2, 1),
                                            (1, 8, 1, 1, 1), (2, 2, 1, 2, 2), (2, 1, 2, 1, 4)])
def test_coords_match_layout(dp, pp, tp, ep, cp):
    world = dp * pp * tp * cp
    for rank in range(world):
        dims = ParallelDims(dp=dp, pp=pp, tp=tp, ep=ep, cp=cp, world_size=world, rank=rank)
        assert dims.coords() == reference_coords(dp, pp, tp, ep, rank, cp)
        c = dims.coords()
        assert dims.global_rank(c["pp"], c["dp"], c["tp"], c["cp"]) == rank


GROUPS = ("dp", "pp", "tp", "ep", "edp", "cp")


def _groups(dp, pp, tp, ep, cp=1):
    dims = ParallelDims(dp=dp, pp=pp, tp=tp, ep=ep, cp=cp, world_size=dist.get_world_size(), ranks_per_node=2).build()
    members = {name: dist.get_process_group_ranks(dims.group(name))
               for name in (*GROUPS, "dp_cp", "edp_cp", "dp_cp_tp", "edp_cp_tp")}
    ranks = {name: getattr(dims, f"{name}_rank") for name in GROUPS}
    # every group's rank as seen by torch equals our arithmetic
    for name in ranks:
        assert dist.get_rank(getattr(dims, f"{name}_group")) == ranks[name], name
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total, group=dims.dp_group)  # the groups are usable, not just listed
    return members, ranks, total.item(), dims.ep_group_ranks(), dims.is_last_pp_stage


def test_groups_on_4_ranks_dp_ep():
    out = run_distributed(_groups, world_size=4, args=(4, 1, 1, 2))
    assert [o[0]["ep"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # ep: consecutive dp ranks
    assert [o[0]["edp"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # edp: same experts
    assert all(o[0]["dp"] == [0, 1, 2, 3] and o[2] == 10.0 for o in out)
    assert [o[3] for o in out] == [o[0]["ep"] for o in out]


def test_groups_on_8_ranks_pp_dp_tp():
    out = run_distributed(_groups, world_size=8, args=(2, 2, 2, 2))
    members = [o[0] for o in out]
    assert [m["tp"] for m in members][:2] == [[0, 1], [0, 1]]
    assert members[0]["dp"] == [0, 2] and members[5]["dp"] == [5, 7]
    assert members[0]["pp"] == [0, 4] and members[3]["pp"] == [3, 7]
    assert members[0]["ep"] == [0, 2] and members[0]["edp"] == [0]
    assert [o[4] for o in out] == [False] * 4 + [True] * 4
    assert out[5][2] == 6.0 + 8.0  # dp group {5, 7}: (5+1) + (7+1)
    assert members[0]["dp_cp_tp"] == [0, 1, 2, 3] and members[0]["edp_cp_tp"] == [0, 1]


def test_groups_on_8_ranks_dp_ep_cp():
    """cp between ep and tp: the cp ranks of one data-parallel rank are adjacent; the gradient replicas of
    dense weights are dp x cp, of experts edp x cp; the ep group joins ranks of the same cp rank."""
    out = run_distributed(_groups, world_size=8, args=(4, 1, 1, 2, 2))
    members = [o[0] for o in out]
    assert [m["cp"] for m in members][:4] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert members[0]["dp"] == [0, 2, 4, 6] and members[1]["dp"] == [1, 3, 5, 7]
    assert members[0]["ep"] == [0, 2] and members[3]["ep"] == [1, 3]
    assert members[0]["edp"] == [0, 4]
    assert members[0]["dp_cp"] == list(range(8)) and members[0]["edp_cp"] == [0, 1, 4, 5]
    assert members[0]["dp_cp_tp"] == list(range(8)) and members[2]["edp_cp_tp"] == [2, 3, 6, 7]
    assert [o[3] for o in out] == [m["ep"] for m in members]


def test_from_config_reads_parallel_section():
    from types import SimpleNamespace

    parallel = SimpleNamespace(dp=2, pp=2, tp=1, ep=2, cp=1, ranks_per_node=4, pp_schedule="1f1b")
    dims = ParallelDims.from_config(parallel, world_size=4)
    assert (dims.dp, dims.pp, dims.ep, dims.edp, dims.ranks_per_node) == (2, 2, 2, 1, 4)
    with pytest.raises(ParallelConfigError, match="world size is 1"):
        ParallelDims.from_config(parallel)  # no torch.distributed here: world size 1
