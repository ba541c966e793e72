"""Run a test body on N gloo processes on CPU: `results = run_distributed(fn, world_size=4, args=(...))`.

Workers are forked from the pytest process (≈0.1 s for 4 ranks instead of ≈10 s for torchrun, see
MACHINE.md), each joins a gloo group through a FileStore in a fresh temporary directory (no port races
between concurrent test runs) with a short collective timeout, runs `fn(*args, **kwargs)` and pickles
its return value to a file. The parent returns the values ordered by rank, or raises
`DistributedTestError` carrying the failing rank's full traceback; a hang is killed after `timeout`.

Every run is under NCCL's rules (`nccl_rules`, MACHINE.md "Gloo is not NCCL"): transfers matched by posting
order, outputs of asynchronous operations poisoned until `wait()`, buffers in flight checked; after the run
the parent compares the ranks' collective and transfer logs, and a disagreement fails the run.
`nccl_rules=False` runs on plain gloo (only to show what the rules catch).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nccl_rules as _nccl_rules
import torch
import torch.distributed as dist

FAILURE_GRACE_S = 2.0  # after one rank fails, how long to wait for the others' own errors


class DistributedTestError(RuntimeError):
    """A worker raised, crashed or hung; the message holds every failing rank's traceback."""


def _worker(
    fn: Callable, rank: int, world_size: int, args: tuple, kwargs: dict, workdir: str, pg_timeout: float,
    rules: bool,
) -> None:
    torch.set_num_threads(1)  # forked children that matmul after a multi-threaded parent can deadlock
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    if rules:
        _nccl_rules.install(dump_on=os.path.join(workdir, "dump"))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(workdir, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result: dict[str, Any] = {"ok": True, "value": fn(*args, **kwargs)}
        if rules:
            _nccl_rules.finish_pending()
    except BaseException:
        result = {"ok": False, "traceback": traceback.format_exc()}
    if rules:
        _nccl_rules.write_log(os.path.join(workdir, f"rank{rank}.json"))
    path = os.path.join(workdir, f"result{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)  # the parent polls for this file: make it appear complete
    if result["ok"] and dist.is_initialized():
        dist.destroy_process_group()


def _read(workdir: str, rank: int) -> dict[str, Any] | None:
    path = os.path.join(workdir, f"result{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _import_before_forking() -> None:
    """What every rank would import on its own after the fork (the data loader's `datasets`, DCP, the symbolic
    shapes a first backward pulls in): imported once here, instead of once per rank on 2 cores."""
    import datasets  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.fx.experimental.symbolic_shapes  # noqa: F401


def run_distributed(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 60.0,
    pg_timeout: float = 30.0,
    nccl_rules: bool = True,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` forked gloo ranks and return their results by rank."""
    _import_before_forking()
    ctx = mp.get_context("fork")
    workdir = tempfile.mkdtemp(prefix="haillm_dist_")
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, args, kwargs or {}, workdir, pg_timeout, nccl_rules))
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        results = _wait(procs, workdir, timeout)
        for p in procs:
            p.join(timeout=10)  # let finished ranks tear their group down before the kill below
        crashed = [f"rank {r}: exit code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0]
        if crashed:  # after returning: a crash tearing the process group down
            raise DistributedTestError("ranks returned but did not exit cleanly: " + ", ".join(crashed))
        if nccl_rules:
            _check_rules(workdir, world_size)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _check_rules(workdir: str, world_size: int) -> None:
    logs = _nccl_rules.read_logs(workdir)
    if len(logs) != world_size:
        return  # a rank crashed: its error is the report
    problems = _nccl_rules.compare(logs)
    if problems:
        raise DistributedTestError("the ranks broke NCCL's matching rules:\n" + "\n".join(problems[:10]))


def _logs_at_hang(workdir: str, world_size: int) -> str:
    """What the ranks' logs say when they hang (under the rules): a mismatched collective or transfer."""
    open(os.path.join(workdir, "dump"), "w").close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(list(Path(workdir).glob("dump.rank*.json"))) < world_size:
        time.sleep(0.05)
    problems = _nccl_rules.compare(_nccl_rules.read_logs(workdir, "dump.rank*.json"))
    return "".join(f"\n{p}" for p in problems[:10])


def _wait(procs: list, workdir: str, timeout: float) -> list[Any]:
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    results: list[dict[str, Any] | None] = [None] * world_size
    first_failure: float | None = None
    while True:
        for r in range(world_size):
            if results[r] is None:
                results[r] = _read(workdir, r)
            if results[r] is None and not procs[r].is_alive():
                results[r] = _read(workdir, r)  # it may have written just before exiting
                if results[r] is None:
                    code = procs[r].exitcode
                    results[r] = {"ok": False, "traceback": f"process exited with code {code}, no result\n"}
        failed = [r for r, res in enumerate(results) if res is not None and not res["ok"]]
        if failed and first_failure is None:
            first_failure = time.monotonic()
        done = all(res is not None for res in results)
        if done or (first_failure is not None and time.monotonic() - first_failure > FAILURE_GRACE_S):
            break
        if time.monotonic() > deadline:
            pending = [r for r, res in enumerate(results) if res is None]
            raise DistributedTestError(f"ranks {pending} did not finish within {timeout:.0f} s (hang?)"
                                       + _logs_at_hang(workdir, world_size))
        time.sleep(0.01)
    if failed:
        text = "\n".join(f"--- rank {r} ---\n{results[r]['traceback']}" for r in failed)
        raise DistributedTestError(f"{len(failed)} of {world_size} ranks failed:\n{text}")
    return [res["value"] for res in results]  # type: ignore[index]
