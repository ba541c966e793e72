"""What autograd keeps for backward, by storage: `kept = saved_storages(model, forward)` runs `forward()`
and returns `{storage pointer: bytes}` of every non-parameter tensor saved during it (with
`model.recompute` on, the tensors that were not replaced by recomputation recipes), and forward's result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from haillm.ops import recompute


def saved_storages(model: torch.nn.Module, forward: Callable[[], Any]) -> tuple[dict[int, int], Any]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def count(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if not model.recompute:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            return kept, forward()
    pack = recompute._pack  # recomputation installs its own hooks: every saved tensor passes through _pack
    recompute._pack = lambda t: count(pack(t))
    try:
        return kept, forward()
    finally:
        recompute._pack = pack
