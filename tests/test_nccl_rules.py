"""The NCCL-rules transport (tests/nccl_rules.py) that every multi-process test runs under: each rule catches
code that plain gloo runs correctly and NCCL would not."""

import pytest
import torch
import torch.distributed as dist
from dist import DistributedTestError, run_distributed

from haillm.parallel.collectives import all_gather_single


def _matched_by_tag():
    """Rank 0 sends an activation then a gradient; rank 1 posts the gradient's receive first, by tag."""
    if dist.get_rank() == 0:
        for value, tag in ((1.0, 0), (2.0, 1)):
            dist.isend(torch.full((4,), value), 1, tag=tag).wait()
        return None
    grad, act = torch.empty(4), torch.empty(4)
    works = [dist.irecv(grad, 0, tag=1), dist.irecv(act, 0, tag=0)]
    for w in works:
        w.wait()
    return act[0].item(), grad[0].item()


def test_transfers_match_by_posting_order_not_tag():
    assert run_distributed(_matched_by_tag, 2, nccl_rules=False)[1] == (1.0, 2.0)  # gloo honours tags
    with pytest.raises(DistributedTestError, match=r"transfer 1 from rank 0 to rank 1: the sender posted "
                                                   r"float32\[4\] tag=0 .* the receiver float32\[4\] tag=1"):
        run_distributed(_matched_by_tag, 2)


def _read_before_wait():
    t = torch.full((3,), float(dist.get_rank() + 1))
    work = dist.all_reduce(t, async_op=True)
    early = t.clone()
    work.wait()
    buf = torch.zeros(2)
    peer = 1 - dist.get_rank()
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), 7.0), peer),
                                    dist.P2POp(dist.irecv, buf, peer)])
    early_recv = buf.clone()
    for work in works:
        work.wait()
    return early.isnan().all().item(), t.tolist(), early_recv.isnan().all().item(), buf.tolist(), len(works)


def test_outputs_hold_poison_until_wait():
    # a batch is one request, as NCCL's coalesced batch (gloo returns one per transfer)
    assert run_distributed(_read_before_wait, 2) == [(True, [3.0] * 3, True, [7.0, 7.0], 1)] * 2
    plain = run_distributed(_read_before_wait, 2, nccl_rules=False)
    assert [(t, b, n) for _, t, _, b, n in plain] == [([3.0] * 3, [7.0, 7.0], 2)] * 2


def _send_buffer_written():
    if dist.get_rank() == 0:
        t = torch.ones(3)
        work = dist.isend(t, 1)
        t.add_(1)  # NCCL may read it after this
        work.wait()
    else:
        dist.recv(torch.empty(3), 0)


def _output_written_before_wait():
    t = torch.ones(3)
    work = dist.all_reduce(t, async_op=True)
    t.zero_()
    work.wait()


def _freed_before_sent():
    if dist.get_rank() == 0:
        t = torch.ones(3)
        work = dist.isend(t, 1)
        t.untyped_storage().resize_(0)
        work.wait()
    else:
        dist.recv(torch.empty(3), 0)


@pytest.mark.parametrize(("fn", "message"), [
    (_send_buffer_written, "a buffer it sends was written or freed before it completed"),
    (_freed_before_sent, "a buffer it sends was written or freed before it completed"),
    (_output_written_before_wait, "its output was written before wait"),
])
def test_buffers_in_flight_are_untouchable(fn, message):
    run_distributed(fn, 2, nccl_rules=False)
    with pytest.raises(DistributedTestError, match=message):
        run_distributed(fn, 2)


def _in_place_gather_and_exchange():
    """ZeRO-1's in-place all-gather (the input is a slice of the output) and an uneven all-to-all."""
    rank = dist.get_rank()
    buf = torch.zeros(4)
    buf[2 * rank: 2 * rank + 2] = torch.tensor([rank + 1.0, rank + 1.5])
    work = all_gather_single(buf, buf[2 * rank: 2 * rank + 2], async_op=True)
    work.wait()
    send = torch.arange(3.0) + 10 * rank
    splits = [1, 2] if rank == 0 else [2, 1]  # rank 0 sends 2 rows to rank 1, which sends it 2 back
    out = torch.empty(3)
    work = dist.all_to_all_single(out, send, splits, splits, async_op=True)
    work.wait()
    return buf.tolist(), out.tolist()


def test_in_place_collectives_work_under_the_rules():
    assert run_distributed(_in_place_gather_and_exchange, 2) == run_distributed(
        _in_place_gather_and_exchange, 2, nccl_rules=False)


def _collectives_out_of_order():
    t = torch.ones(2)
    if dist.get_rank() == 0:
        dist.all_reduce(t)
        dist.broadcast(t, 0)
    else:
        dist.broadcast(t, 0)
        dist.all_reduce(t)


def test_collective_order_mismatch_names_both_calls():
    with pytest.raises(DistributedTestError, match=r"collective 1 differs: rank 0 called #1 all_reduce\(float32\[2\].*"
                                                   r"_collectives_out_of_order, rank 1 called #1 broadcast"):
        run_distributed(_collectives_out_of_order, 2, timeout=4, pg_timeout=30)
