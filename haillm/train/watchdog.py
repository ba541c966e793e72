"""Hang protection: a watchdog thread per rank, and the diagnosis that names the rank holding a job up.

- A step that runs longer than `train.watchdog_factor` times the median step logs the stack of every thread
  (once per step): where a straggler or a stuck data read is spending its time.
- No progress for `train.collective_timeout_s` (a collective that cannot complete: a rank stalled, died, or
  never joined), or a failed collective in the training thread (gloo: "connection closed by peer" when a rank
  died; a collective timeout), starts a diagnosis round. The rank draws a new round number in the job's store
  and publishes its status there: how many collectives it has issued on each of its process groups and where
  its training thread is. Every other rank without progress for half the timeout (in a hang, all of them)
  answers with its own status within a poll of the watchdog thread, wherever it is stuck: in a step, an
  evaluation or a checkpoint save. Statuses of earlier rounds are ignored. A rank that is behind on a group
  that others have gone further in, and ahead of nobody, is what the others wait for; a rank that never
  answers is dead or frozen. The error names them, then the rank exits with `PEER_FAILURE_EXIT` instead of
  waiting in a collective that will never finish: at most `train.collective_timeout_s` plus a poll (1 s at
  most) plus the round's patience (`patience`) after its last progress. A round that blames nobody (every rank
  busy: a slow step) is logged, and the next comes a timeout later if there is still no progress.
The group carrying the pipeline's point-to-point traffic is left out (its ranks issue different numbers of
operations by design, and a backend may or may not count transfers); instead each rank reports how many
transfers it has posted to and from each peer, and a rank that has not posted the counterpart of a transfer
another rank posted is behind in the same sense. The same code serves NCCL, whose collectives also time out
on their own (`TORCH_NCCL_ASYNC_ERROR_HANDLING`), and gloo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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
GLOO_ERROR = re.compile(r"\[[^\]\n]*/gloo/[^\]\n]*:\d+\]")  # gloo's source location, e.g. [.../gloo/x.cc:78]
ROUND_KEY = "haillm/watchdog/round"  # the latest diagnosis round (a counter)
STATUS_KEY = "haillm/watchdog/rank{}"  # a rank's latest status, stamped with the round it answers
READ_KEY = "haillm/watchdog/read{}"  # the latest round whose statuses a diagnosing rank has gathered


def patience(timeout_s: float) -> float:
    """How long a diagnosis round waits for the other ranks' statuses."""
    return max(2.0, min(10.0, timeout_s / 2))


class PeerFailure(RuntimeError):
    """A collective failed or timed out; the message names the ranks holding the job up (one line)."""


def is_comm_failure(exc: BaseException) -> bool:
    """An error raised by a collective whose peers died or stalled, not a bug of this rank: NCCL and the store
    raise `DistError`s; gloo a plain RuntimeError naming its source location (`[…/gloo/transport/tcp/
    pair.cc:537] Read error …: Connection reset by peer`, `[…/unbound_buffer.cc:78] Timed out waiting …`)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and GLOO_ERROR.search(str(exc)) is not None


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
        self._round_end = 0.0  # when this rank's last diagnosis round ended (monotonic)
        self._answered = 0  # the latest round this rank published its status for
        self._thread = threading.Thread(target=self._watch, name="haillm-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._stop.set()
        # The thread holds the pipeline runtime (through `p2p`) and so its process groups: it must drop them now.
        # Left to end on its own, it could drop the last reference while the interpreter shuts down, and a
        # process group destroyed from a daemon thread then aborts the process ("terminate called without an
        # active exception", exit code -6 after a successful run).
        self._thread.join(timeout=patience(self.timeout_s) + 1.0)
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
            if self.world == 1:
                continue
            if now - max(self.last_progress, self._round_end) > self.timeout_s:
                self._diagnose_hang(now)
            elif now - self.last_progress > self.timeout_s / 2:
                self._answer()

    def _diagnose_hang(self, now: float) -> None:
        """Name the rank holding the job up and end the process, or log that there is none yet."""
        what = f"no progress on rank {self.rank} for {now - self.last_progress:.0f} s"
        try:
            message = self.diagnose(what, blame_required=True)
        except Exception as exc:  # never let the watchdog die silently while the job hangs
            message = f"{what}; the diagnosis failed ({type(exc).__name__}: {exc})"
        self._round_end = time.monotonic()
        if message is None:
            log.warning("%s, but no rank is behind another in collectives: a slow step, not a hang", what)
            return
        print(f"haillm: error: {message}", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(PEER_FAILURE_EXIT)

    def _answer(self) -> None:
        """Publish this rank's status for a round that another rank has started since the last answer."""
        if not self._lock.acquire(blocking=False):  # this rank is diagnosing: it answers from there
            return
        try:
            with contextlib.suppress(Exception):  # an unreachable store: the round's owner will say so
                store = dist.distributed_c10d._get_default_store()
                latest = store.add(ROUND_KEY, 0)
                if latest > self._answered:
                    self._publish(store, latest, gathering=False)
        finally:
            self._lock.release()

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

    def _publish(self, store: dist.Store, round_: int, gathering: bool) -> None:
        store.set(STATUS_KEY.format(self.rank), json.dumps({"round": round_, "gathering": gathering,
                                                            **self._status()}))
        self._answered = round_

    def _gather(self) -> dict[int, dict]:
        """Every rank's status for this round (or a later one) that arrives within `patience` of starting it,
        answering later rounds meanwhile. Once all have arrived, wait (within the same patience) until the
        other ranks that are diagnosing have gathered theirs: the store may live in this process (rank 0
        without torchrun) and would vanish with it."""
        deadline = time.monotonic() + patience(self.timeout_s)
        statuses: dict[int, dict] = {}
        with contextlib.suppress(Exception):  # an unreachable store leaves what was gathered so far
            store = dist.distributed_c10d._get_default_store()
            first = store.add(ROUND_KEY, 1)
            self._publish(store, first, gathering=True)
            read = 0  # the round up to which this rank has read every status
            while time.monotonic() < deadline:
                latest = store.add(ROUND_KEY, 0)
                if latest > self._answered:
                    self._publish(store, latest, gathering=True)
                for r in range(self.world):
                    if r not in statuses and store.check([STATUS_KEY.format(r)]):
                        status = json.loads(store.get(STATUS_KEY.format(r)))
                        if status["round"] >= first:
                            statuses[r] = status
                if len(statuses) == self.world and read < self._answered:
                    read = self._answered
                    store.set(READ_KEY.format(self.rank), str(read))
                readers = [READ_KEY.format(r) for r, status in statuses.items() if status["gathering"]]
                if read and store.check(readers) and all(int(v) >= first for v in store.multi_get(readers)):
                    break
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
