"""Measured memory of a training rank, by storage, for checking the planner (haillm.tools.plan).

- ``state_bytes(model, optimizer)``: distinct storages of the parameters, of their gradients, and of the
  optimizer's state as its ``state_dict`` exposes it (minus storages that are parameters: fp32 master
  shards are slices of the parameter buckets).
- ``LiveSaved``: while active (``with probe:``), every tensor autograd saves for backward is tracked until
  it is released (graph freed after backward, or a deferred weight-gradient closure dropped it); ``peak``
  is the most bytes of distinct non-parameter storages alive at once. Recomputation's own saving hook is
  wrapped (as ``saved_tensors.py`` does) so that only what it really keeps is counted.
- ``allocated_during(fn)``: what the allocator says instead of autograd: bytes of the CPU blocks allocated
  while ``fn()`` runs and still allocated when it returns (the memory a forward leaves resident: its saved
  tensors, and anything else it keeps alive), from ``torch.profiler``'s allocation events; and ``fn()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.distributed._shard.sharded_tensor import ShardedTensor

from haillm.ops import recompute


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (None skipped, and tensors without data: the fake tensors a
    ``torch.compile`` leaves behind, which a forked test process still holds)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:  # "Cannot access data pointer of Tensor (e.g. FakeTensor, FunctionalTensor)"
            continue
    return sum(seen.values())


def state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    params = list(model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad for p in params]
    state = []
    for per_param in optimizer.state_dict()["state"].values():
        for t in per_param.values():
            pieces = [s.tensor for s in t.local_shards()] if isinstance(t, ShardedTensor) else [t]
            state += [p for p in pieces if p.untyped_storage().data_ptr() not in param_ptrs]
    return {"parameters": storage_bytes(params), "gradients": storage_bytes(grads),
            "optimizer": storage_bytes(state)}


class LiveSaved:
    def __init__(self, model: torch.nn.Module):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tracked tensors alive]
        self.now = self.peak = 0

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.exclude or nbytes == 0:
            return t
        entry = self.live.setdefault(ptr, [nbytes, 0])
        if entry[1] == 0:
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __enter__(self):
        self._pack = recompute._pack
        recompute._pack = lambda t: self._track(self._pack(t))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._track, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        recompute._pack = self._pack


def allocated_during(fn: Callable[[], Any]) -> tuple[int, Any]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live: dict[int, int] = {}
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    events = []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
        else:
            live.pop(ptr, None)  # a free (of a block of this window, or of an older one: not counted)
    return sum(live.values()), out
