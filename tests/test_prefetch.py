"""Prefetch: the background-prepared batches are exactly the batcher's, the data position counts only steps
handed out (so checkpoints resume exactly), errors surface in the training thread; on CUDA the batches
arrive on the device through pinned memory."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_train import FAST, launch_train

from haillm.data import ByteTokenizer, PackedDataset, StepBatcher, StepSampler
from haillm.data.prefetch import Prefetcher


def batcher() -> StepBatcher:
    rows = torch.arange(23 * 5, dtype=torch.int32).reshape(23, 5)
    dataset = PackedDataset(rows, ByteTokenizer(), "test", rows.numel())
    return StepBatcher(dataset, StepSampler(23, 6, seed=3), micro_batch_size=3)


def test_same_batches_and_position_as_the_batcher():
    plain, fetched = batcher(), Prefetcher(batcher(), torch.device("cpu"))
    for step in range(1, 9):  # crosses epochs
        want, got = plain.next_step(), fetched.next_step()
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))
        assert fetched.state_dict() == plain.state_dict() and fetched.state_dict()["consumed_samples"] == 6 * step
    state = plain.state_dict()
    expected = [plain.next_step() for _ in range(3)]
    resumed = Prefetcher(batcher(), torch.device("cpu"))
    resumed.next_step()  # a step prepared in the background is dropped when the position moves
    resumed.load_state_dict(state)
    got = [resumed.next_step() for _ in range(3)]
    assert all(torch.equal(a, b) for e, g in zip(expected, got, strict=True) for a, b in zip(e, g, strict=True))
    resumed.close()
    assert not any(t.name == "haillm-prefetch" for t in threading.enumerate())


def test_background_error_reaches_the_training_thread():
    fetched = Prefetcher(batcher(), torch.device("cpu"))
    fetched.next_step()
    fetched.job.join()  # step 2 is ready before the breakage

    def broken(indices):
        raise OSError("shard vanished")

    fetched.batcher.dataset.gather = broken
    fetched.next_step()
    with pytest.raises(OSError, match="shard vanished"):
        fetched.next_step()


def test_a_run_prepares_only_its_steps_and_leaves_no_thread(tmp_path, monkeypatch):
    """launch/train.py prefetches steps 1..train.steps, not the one after, and no prefetch thread outlives
    it (each preparation is slowed so that one still running at the end would be seen)."""
    prepared = []
    step_at = StepBatcher.step_at

    def slow_step_at(self, consumed_samples):
        prepared.append(consumed_samples)
        time.sleep(0.2)
        return step_at(self, consumed_samples)

    monkeypatch.setattr(StepBatcher, "step_at", slow_step_at)
    assert launch_train.main([*FAST, "train.steps=2", f"output_dir={tmp_path}"]) == 0
    assert not any(t.name == "haillm-prefetch" for t in threading.enumerate())
    assert prepared == [0, 4]  # train.global_batch_size=4


@pytest.mark.gpu
def test_cuda_batches_arrive_on_the_device():
    device = torch.device("cuda", torch.cuda.current_device())
    plain, fetched = batcher(), Prefetcher(batcher(), device)
    for _ in range(4):
        want, got = plain.next_step(), fetched.next_step()
        assert all(g.device == device for g in got)
        assert all(torch.equal(w.to(device), g) for w, g in zip(want, got, strict=True))
        torch.cuda.current_stream().synchronize()
    assert fetched.stream is not None and fetched.stream != torch.cuda.current_stream()
