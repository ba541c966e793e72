"""What autograd keeps for backward, by storage: `kept = saved_storages(model, forward)` runs `forward()`
and returns `{storage pointer: bytes}` of every non-parameter tensor saved during it (with
`model.recompute` on, the tensors that were not replaced by recomputation recipes), and forward's result.
`blocks`, if given, is filled with `{storage pointer: name}`: the transformer block of `model.layers` that saved
it first ("" outside them), so that a layer's share can be told from the rest. `recipe_arguments`: also the
tensors a recipe holds as its arguments (what the forward keeps for backward, recipes included)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from haillm.ops import recompute


def saved_storages(model: torch.nn.Module, forward: Callable[[], Any], blocks: dict[int, str] | None = None,
                   recipe_arguments: bool = False) -> tuple[dict[int, int], Any]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    inside = [""]  # the block whose forward is running

    def keep(t) -> None:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            ptr = t.untyped_storage().data_ptr()
            if blocks is not None and ptr not in kept:
                blocks[ptr] = inside[-1]
            kept[ptr] = t.untyped_storage().nbytes()

    def count(t):
        keep(t)
        tag = t.tag if isinstance(t, recompute._View) else t if isinstance(t, tuple) else None  # a recipe's
        for arg in tag[0].args if recipe_arguments and tag is not None else ():
            keep(arg)  # what the recipe holds to recompute from
        return t

    def enter(name: str) -> Callable[..., None]:
        def hook(*_) -> None:
            inside.append(name)
        return hook

    def leave(*_) -> None:
        inside.pop()

    hooks = [] if blocks is None else [h for name, layer in model.layers.items()
                                       for h in (layer.register_forward_pre_hook(enter(name)),
                                                 layer.register_forward_hook(leave))]
    try:
        if not model.recompute:
            with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                return kept, forward()
        pack = recompute._pack  # recomputation installs its own hooks: every saved tensor passes through _pack
        recompute._pack = lambda t: count(pack(t))
        try:
            return kept, forward()
        finally:
            recompute._pack = pack
    finally:
        for h in hooks:
            h.remove()
