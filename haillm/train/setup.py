"""Process start-up: torch.distributed from torchrun's environment, the device, seeds, determinism."""

from __future__ import annotations

import os
import random
import time
import uuid
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

_job_store: dist.Store | None = None  # torchrun's store, shared by every restart of the job
_attempt = 1  # which attempt of the torchrun job this process belongs to (1: the first)


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU), with `timeout_s` for
    every collective (NCCL also tears a timed-out communicator down: async error handling).

    Returns (global rank, world size, device). A plain `python launch/train.py` is world size 1 and
    creates no process group.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        rank, world, timeout = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timedelta(seconds=timeout_s)
        store = attempt_store(rank, world, timeout)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank if store else -1,
                                world_size=world if store else -1, timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, a view of its store that only this attempt of the job uses; None elsewhere.

    torchrun keeps one store for the whole job (``TORCHELASTIC_USE_AGENT_STORE``) and restarted workers join
    it again: without a fresh namespace they read the dead workers' addresses (gloo: "connection refused",
    NCCL: a stale unique id) or wait on keys that will never change -- the hang after ``--max-restarts``
    (pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt: each node's agent counts its
    own restarts. So the attempt number is agreed in the store itself (``_agree_attempt``).
    """
    global _job_store, _attempt
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    _job_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                               is_master=False, timeout=timeout)
    _attempt = _agree_attempt(_job_store, rank, world, timeout.total_seconds())
    return dist.PrefixStore(f"haillm/attempt_{_attempt}/", _job_store)


def _agree_attempt(store: dist.Store, rank: int, world: int, timeout_s: float) -> int:
    """Rank 0 draws a new attempt number; every other rank learns it under a key named after a nonce it
    has just drawn, which no earlier attempt can have written. Rank 0 answers each nonce it finds until all
    ranks confirm (stale nonces of dead workers get answers nobody reads)."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"haillm/nonce/{rank}", nonce)
        store.wait([f"haillm/welcome/{nonce}"])
        attempt = int(store.get(f"haillm/welcome/{nonce}"))
        store.set(f"haillm/attempt_{attempt}/joined/{rank}", "1")
        return attempt
    attempt = store.add("haillm/attempts", 1)
    others = range(1, world)
    joined = [f"haillm/attempt_{attempt}/joined/{r}" for r in others]
    store.wait([f"haillm/nonce/{r}" for r in others])  # present at once on a restart (stale), else fresh
    deadline, answered = time.monotonic() + timeout_s, set()
    while not store.check(joined):
        for nonce in store.multi_get([f"haillm/nonce/{r}" for r in others]):
            if nonce not in answered:
                store.set(f"haillm/welcome/{nonce.decode()}", str(attempt))
                answered.add(nonce)
        if time.monotonic() > deadline:
            missing = [r for r, key in zip(others, joined, strict=True) if not store.check([key])]
            raise RuntimeError(f"ranks {missing} did not join attempt {attempt} of the job within {timeout_s:.0f} s")
        time.sleep(0.01)
    return attempt


def job_store() -> dist.Store | None:
    """torchrun's store shared by all restarts of this job (None outside torchrun): what must survive a
    restart, such as the resolved run directory, is kept there."""
    return _job_store


def restarts() -> int:
    """How many times torchrun restarted this job's workers before this attempt (0 outside torchrun)."""
    return _attempt - 1


def broadcast_object(obj: object) -> object:
    """Rank 0's value of `obj` on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: object) -> list:
    """Every rank's value of `obj`, by rank ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, obj)
    return values


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also forbid nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
