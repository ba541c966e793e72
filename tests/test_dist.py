"""The multi-process test harness itself: results come back by rank, failures and hangs surface."""

import time

import pytest
import torch
import torch.distributed as dist
from dist import DistributedTestError, run_distributed


def _sum_of_ranks(scale):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item() * scale


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # the other ranks now wait for rank 1 forever


def _hang():
    time.sleep(3600)


def test_results_come_back_by_rank():
    assert run_distributed(_sum_of_ranks, world_size=3, args=(2.0,)) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_failing_rank_traceback_is_raised_and_peers_are_killed():
    # rank 0 would sit in barrier for pg_timeout (600 s) > timeout (30 s): getting rank 1's error rather
    # than a timeout proves the harness reports the failure and kills the stuck peer
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_fail_on_rank_one, world_size=2, timeout=30, pg_timeout=600)
    assert "rank 1" in str(err.value) and "deliberate failure on rank one" in str(err.value)
    assert "_fail_on_rank_one" in str(err.value)  # the full traceback, not just the message


def test_hang_times_out():
    with pytest.raises(DistributedTestError, match="did not finish within 2 s"):
        run_distributed(_hang, world_size=2, timeout=2)
