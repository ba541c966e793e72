"""Hang protection: a watchdog thread per rank, and the diagnosis that names the rank holding a job up.

- A step that runs longer than `train.watchdog_factor` times the median step logs the stack of every thread
  (once per step): where a straggler or a stuck data read is spending its time.
- No progress for `train.collective_timeout_s` (a collective that cannot complete: a rank stalled, died, or
  never joined), or a failed collective in the training thread (gloo: "connection closed by peer" when a rank
  died; a collective timeout), starts the diagnosis. Every rank that gets there publishes, in the job's
  store, how many collectives it has issued on each of its process groups and where its training thread is.
  A rank that is behind on a group that others have gone further in, and ahead of nobody, is what the others
  wait for; a rank that never answers is dead or frozen. The error names them, then the rank exits with
  `PEER_FAILURE_EXIT` instead of waiting in a collective that will never finish.
The group carrying the pipeline's point-to-point traffic is left out (its ranks issue different numbers of
operations by design, and a backend may or may not count transfers); instead each rank reports how many
transfers it has posted to and from each peer, and a rank that has not posted the counterpart of a transfer
another rank posted is behind in the same sense. The same code serves NCCL, whose collectives also time out on their own
(`TORCH_NCCL_ASYNC_ERROR_HANDLING`), and gloo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch.distributed as dist

from haillm.train import faults

log = logging.getLogger(__name__)
PEER_FAILURE_EXIT = 4  # the process exit code when a rank died, stalled or a collective failed
STATUS_KEY = "haillm/watchdog/step{}/rank{}"  # one diagnosis per step at most: statuses are never stale
READ_KEY = "haillm/watchdog/step{}/read{}"


class PeerFailure(RuntimeError):
    """A collective failed or timed out; the message names the ranks holding the job up (one line)."""


def is_comm_failure(exc: BaseException) -> bool:
    """An error raised by a collective whose peers died or stalled (gloo or NCCL), not a bug of this rank."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection closed",
                                                                     "Connection reset", "Timed out", "timed out"))


def where(frame) -> str:
    """`file.py:line function` of the innermost frame."""
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}" if frame else "?"


class Watchdog:
    """`skip_groups` are left out of the collective counts; `p2p` returns the point-to-point transfers this rank
    has posted, {"send"|"recv": {global peer rank: count}} (`PipelineRuntime.p2p_posted`)."""

    def __init__(self, timeout_s: float, slow_factor: float, skip_groups: Iterable[dist.ProcessGroup | None] = (),
                 p2p: Callable[[], dict[str, dict[int, int]]] | None = None):
        self.timeout_s, self.slow_factor, self.p2p = timeout_s, slow_factor, p2p
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.skip = {pg.group_name for pg in skip_groups if pg is not None}
        self.thread_id = threading.get_ident()  # the training thread
        self.step, self.step_start, self.last_progress = 0, None, time.monotonic()
        self.durations: deque[float] = deque(maxlen=100)
        self.slow_reported = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one diagnosis per process, from whichever thread sees the failure
        self._message: str | None = None
        self._checked = -1  # the step the watchdog thread last diagnosed
        self._thread = threading.Thread(target=self._watch, name="haillm-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._stop.set()
        if exc is not None and self.world > 1 and is_comm_failure(exc):
            raise PeerFailure(self.diagnose(f"a collective failed on rank {self.rank} "
                                            f"({str(exc).splitlines()[0][:160]})")) from exc

    @contextlib.contextmanager
    def step_of(self, step: int) -> Iterator[None]:
        """Time one optimizer step (the fault hooks of the tests fire here)."""
        self.step, self.step_start, self.slow_reported = step, time.monotonic(), False
        self.last_progress = self.step_start
        faults.inject("step", step)
        yield
        now = time.monotonic()
        self.durations.append(now - self.step_start)
        self.step_start, self.last_progress = None, now

    def progress(self) -> None:
        """Work between steps (a checkpoint write) is progress too."""
        self.last_progress = time.monotonic()

    # ---- the watchdog thread ----
    def _watch(self) -> None:
        poll = min(1.0, max(0.05, self.timeout_s / 20))
        while not self._stop.wait(poll):
            now, start = time.monotonic(), self.step_start
            if (start is not None and self.slow_factor and not self.slow_reported and len(self.durations) >= 5
                    and now - start > self.slow_factor * statistics.median(self.durations)):
                self.slow_reported = True
                log.warning("step %d has run %.1f s, over %g x the median step (%.2f s); stacks of all threads:\n%s",
                            self.step, now - start, self.slow_factor, statistics.median(self.durations),
                            self.stacks())
            if self.world > 1 and now - self.last_progress > self.timeout_s and self._checked != self.step:
                self._checked = self.step
                what = f"no progress on rank {self.rank} for {now - self.last_progress:.0f} s"
                try:
                    message = self.diagnose(what, blame_required=True)
                except Exception as exc:  # never let the watchdog die silently while the job hangs
                    message = f"{what}; the diagnosis failed ({type(exc).__name__}: {exc})"
                if message is None:
                    log.warning("%s, but no rank is behind another in collectives: a slow step, not a hang", what)
                else:
                    print(f"haillm: error: {message}", file=sys.stderr, flush=True)
                    for handler in logging.getLogger().handlers:
                        handler.flush()
                    os._exit(PEER_FAILURE_EXIT)

    def stacks(self) -> str:
        names = {t.ident: t.name for t in threading.enumerate()}
        return "\n".join(f"--- thread {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
                         for ident, frame in sys._current_frames().items())

    # ---- diagnosis ----
    def _status(self) -> dict:
        seqs = {}
        for pg in list(dist.distributed_c10d._world.pg_map):
            if isinstance(pg, dist.ProcessGroup) and pg.group_name not in self.skip:
                with contextlib.suppress(RuntimeError, AttributeError):
                    seqs[pg.group_name] = pg._get_sequence_number_for_group()
        frame = sys._current_frames().get(self.thread_id)
        return {"step": self.step, "where": where(frame), "seqs": seqs, "p2p": self.p2p() if self.p2p else {}}

    def diagnose(self, what: str, blame_required: bool = False) -> str | None:
        """Publish this rank's status, gather the others' (waiting a few seconds), and say who holds the job
        up. With `blame_required`, None when nobody is behind (every rank is busy: not a hang yet)."""
        with self._lock:
            if self._message is not None:  # the other thread of this rank got there first and ends the process
                time.sleep(30)
                return self._message
            for sig in (signal.SIGTERM, signal.SIGINT):  # going down anyway: a signal now ends it at once
                with contextlib.suppress(ValueError):  # only the main thread may change handlers
                    signal.signal(sig, signal.SIG_DFL)
            statuses = self._gather()
            missing, behind = holdups(statuses, self.world)
            if blame_required and not missing and not behind:
                return None
            parts = [f"rank {r} did not answer (dead or frozen)" for r in missing]
            parts += [f"rank {r} is behind: ranks {waiting} wait for it in collectives; it is at step "
                      f"{statuses[r]['step']} in {statuses[r]['where']}" for r, waiting in behind.items()]
            self._message = (f"{what}; " + "; ".join(parts or ["no rank is behind another in collectives"])
                             + f" (train.collective_timeout_s={self.timeout_s:g})")
            log.error(self._message)
            return self._message

    def _gather(self) -> dict[int, dict]:
        """Every rank's status that arrives within a few seconds of publishing this rank's. Before returning,
        wait (as long again at most) until the ranks that answered have read them: the store may live in this
        process (rank 0 without torchrun) and would vanish with it."""
        patience = max(2.0, min(10.0, self.timeout_s / 2))
        statuses: dict[int, dict] = {}
        with contextlib.suppress(Exception):  # an unreachable store leaves what was gathered so far
            store = dist.distributed_c10d._get_default_store()
            step = self.step
            store.set(STATUS_KEY.format(step, self.rank), json.dumps(self._status()))
            deadline = time.monotonic() + patience
            while len(statuses) < self.world and time.monotonic() < deadline:
                for r in range(self.world):
                    if r not in statuses and store.check([STATUS_KEY.format(step, r)]):
                        statuses[r] = json.loads(store.get(STATUS_KEY.format(step, r)))
                time.sleep(0.05)
            store.set(READ_KEY.format(step, self.rank), "1")
            deadline = time.monotonic() + patience
            while not store.check([READ_KEY.format(step, r) for r in statuses]) and time.monotonic() < deadline:
                time.sleep(0.05)
        return statuses


def holdups(statuses: dict[int, dict], world: int) -> tuple[list[int], dict[int, list[int]]]:
    """(ranks without a status, {rank: ranks waiting for it}). Rank y holds others up when it has issued
    fewer collectives than some member of one of its groups and more than nobody in any of them; the transfers
    from x to y count as a group of two, x's posted sends against y's posted receives."""
    missing = [r for r in range(world) if r not in statuses]
    groups: dict[str, dict[int, int]] = {}
    for r, status in statuses.items():
        for name, seq in status["seqs"].items():
            groups.setdefault(name, {})[r] = seq
    for r, status in statuses.items():  # JSON made the peer ranks strings
        for direction, counts in status.get("p2p", {}).items():
            for peer, count in counts.items():
                if int(peer) in statuses:
                    src, dst = (r, int(peer)) if direction == "send" else (int(peer), r)
                    groups.setdefault(f"p2p {src}>{dst}", {src: 0, dst: 0})[r] = count
    behind: dict[int, list[int]] = {}
    for y in statuses:
        mine = [(seqs, seqs[y]) for seqs in groups.values() if y in seqs]
        if any(seq > min(seqs.values()) for seqs, seq in mine):
            continue  # y is ahead of someone: it waits too
        waiting = sorted({x for seqs, seq in mine for x, s in seqs.items() if s > seq})
        if waiting:
            behind[y] = waiting
    return missing, behind
