"""Fault injection for the reliability tests:
`HAILLM_FAULT=<kind>:step=<N>[:rank=<R>][:seconds=<S>][:attempt=<A>]`, several separated by `;`.

Kinds: `stall` (sleep S seconds at the start of step N), `sigterm` (send this process SIGTERM during step N),
`kill` (SIGKILL during step N, once this rank's checkpoint write in flight is committed: a kill lands between two
checkpoints whatever the machine's load), `kill_in_checkpoint` (SIGKILL after this rank wrote its part of the step-N
checkpoint, before the checkpoint is complete). Only global rank R (default 0) is hit, and only in attempt A
(default 0: the first) of a torchrun job, so that a restart runs clean, or meets the next fault. Unset,
nothing happens.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch.distributed as dist

from haillm.train.setup import restarts

KINDS = ("stall", "sigterm", "kill", "kill_in_checkpoint")
FIELDS = ("step", "rank", "seconds", "attempt")


def _parse(text: str) -> dict[str, str]:
    kind, *fields = text.split(":")
    pairs = [field.split("=", 1) for field in fields]
    spec = dict(pair for pair in pairs if len(pair) == 2)
    if kind not in KINDS or "step" not in spec or len(spec) < len(pairs) or not set(spec) <= set(FIELDS):
        raise ValueError(f"HAILLM_FAULT={text!r}: expected "
                         f"<{'|'.join(KINDS)}>:step=<N>[:rank=<R>][:seconds=<S>][:attempt=<A>]")
    return {"kind": kind, **spec}


def _specs() -> list[dict[str, str]]:
    text = os.environ.get("HAILLM_FAULT")
    return [_parse(part) for part in text.split(";")] if text else []


def inject(point: str, step: int) -> None:
    """Fire the configured faults that belong at `point` ("step" or "checkpoint") of `step` on this rank."""
    for spec in _specs():
        if int(spec["step"]) != step or restarts() != int(spec.get("attempt", 0)):
            continue
        rank = dist.get_rank() if dist.is_initialized() else 0
        if int(spec.get("rank", 0)) != rank or (point == "checkpoint") != (spec["kind"] == "kill_in_checkpoint"):
            continue
        if spec["kind"] == "stall":
            time.sleep(float(spec.get("seconds", 3600)))
        elif spec["kind"] == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            if point == "step":
                _join_checkpoint_writers()
            os.kill(os.getpid(), signal.SIGKILL)


def _join_checkpoint_writers() -> None:
    """Wait for this rank's background checkpoint write: it returns after rank 0 has committed the checkpoint."""
    from haillm.train.checkpoint import WRITER_THREAD  # here: checkpoint.py imports this module

    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD:
            thread.join()
