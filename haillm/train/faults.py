"""Fault injection for the reliability tests: `HAILLM_FAULT=<kind>:step=<N>[:rank=<R>][:seconds=<S>]`.

Kinds: `stall` (sleep S seconds at the start of step N), `sigterm` (send this process SIGTERM during step N),
`kill` (SIGKILL during step N), `kill_in_checkpoint` (SIGKILL after this rank wrote its part of the step-N
checkpoint, before the checkpoint is complete). Only global rank R (default 0) is hit, and only in the first
attempt of a torchrun job, so that a restart runs clean. Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from haillm.train.setup import restarts

KINDS = ("stall", "sigterm", "kill", "kill_in_checkpoint")


def _spec() -> dict[str, str] | None:
    text = os.environ.get("HAILLM_FAULT")
    if not text:
        return None
    kind, *fields = text.split(":")
    pairs = [field.split("=", 1) for field in fields]
    spec = dict(pair for pair in pairs if len(pair) == 2)
    if kind not in KINDS or "step" not in spec or len(spec) < len(pairs):
        raise ValueError(f"HAILLM_FAULT={text!r}: expected <{'|'.join(KINDS)}>:step=<N>[:rank=<R>][:seconds=<S>]")
    return {"kind": kind, **spec}


def inject(point: str, step: int) -> None:
    """Fire the configured fault if it belongs at `point` ("step" or "checkpoint") of `step` on this rank."""
    spec = _spec()
    if spec is None or int(spec["step"]) != step or restarts() > 0:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    if int(spec.get("rank", 0)) != rank or (point == "checkpoint") != (spec["kind"] == "kill_in_checkpoint"):
        return
    if spec["kind"] == "stall":
        time.sleep(float(spec.get("seconds", 3600)))
    elif spec["kind"] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
