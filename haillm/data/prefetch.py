"""Prefetch: the next step's micro-batches are gathered in a background thread while the current step runs.

On CUDA they are gathered into pinned memory and copied to the GPU on a side stream in that thread too,
so the step finds them on the device; the training stream waits on the copy's event only. The data
position stays the batcher's: the prefetched step counts as consumed only once handed out, so a
checkpoint taken between steps resumes exactly (the step at a position is a pure function of it).
"""

from __future__ import annotations

import threading

import torch

from haillm.data.sampler import StepBatcher


class _Job(threading.Thread):
    """One step's micro-batches, prepared in its own short-lived thread (no thread outlives a run)."""

    def __init__(self, prefetcher: Prefetcher, consumed_samples: int):
        super().__init__(name="haillm-prefetch", daemon=True)
        self.prefetcher, self.consumed_samples = prefetcher, consumed_samples
        self.batches: list[torch.Tensor] | None = None
        self.event: torch.cuda.Event | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.batches, self.event = self.prefetcher.prepare(self.consumed_samples)
        except BaseException as e:  # re-raised in the training thread
            self.error = e

    def result(self) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.batches, self.event


class Prefetcher:
    """A StepBatcher whose next step is always being prepared, up to the step that starts at `end` samples
    (the run's last, so nothing is read for a step that never runs); same interface (`next_step`, state)."""

    def __init__(self, batcher: StepBatcher, device: torch.device, end: int | None = None):
        self.batcher, self.device, self.end = batcher, device, end
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.job: _Job | None = None

    def prepare(self, consumed_samples: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        batches = self.batcher.step_at(consumed_samples)
        if not self.cuda:
            return batches, None
        with torch.cuda.stream(self.stream):
            batches = [b.pin_memory().to(self.device, non_blocking=True) for b in batches]
            event = torch.cuda.Event()
            event.record(self.stream)
        return batches, event

    def next_step(self) -> list[torch.Tensor]:
        sampler = self.batcher.sampler
        position = sampler.consumed_samples
        job = self.job
        if job is None or job.consumed_samples != position:  # the first step, or a new position (resume)
            if job is not None:
                job.join()
            job = _Job(self, position)
        batches, event = job.result()
        sampler.consumed_samples = position + sampler.global_batch_size
        ahead = sampler.consumed_samples
        self.job = _Job(self, ahead) if self.end is None or ahead < self.end else None
        if event is not None:  # the training stream must not read before the copy is done
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for b in batches:
                b.record_stream(current)
        return batches

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state)

    def close(self) -> None:
        """Wait for the step being prepared (nothing else runs in the background)."""
        if self.job is not None:
            self.job.join()
            self.job = None
