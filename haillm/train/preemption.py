"""Preemption: SIGTERM or SIGINT on any rank stops the whole job at the next step boundary, with a checkpoint.

The handler only records the signal and puts the default action back, so a second signal ends the process at
once (checkpoints are written under a temporary name and renamed when complete: nothing is corrupted).
After every step the ranks agree with one small all-reduce (MAX of "a signal arrived here"), so all of them
stop after the same step even if the signal reached one rank only. torchrun forwards SIGTERM to its workers
and waits 30 s before SIGKILL; cluster schedulers (SLURM, Kubernetes) send SIGTERM before the kill too.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self, device: torch.device):
        self.device = device
        self.received = 0  # the first signal number, 0 for none
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        log.warning("%s received: stopping after this step with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def agreed(self) -> str | None:
        """The signal that stops the job, identical on every rank (None: keep training). Collective."""
        flag = self.received
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = torch.tensor([flag], dtype=torch.int64, device=self.device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            flag = int(box.item())
        return signal.Signals(flag).name if flag else None
