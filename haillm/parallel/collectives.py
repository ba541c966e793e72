"""Collectives under one name on every torch this project runs on: torch 2.13 adds ``reduce_scatter_single``
and ``all_gather_single`` and deprecates the older names; torch 2.11 (on our GPU machine) has only those.
The lookup happens at call time, so a test that wraps ``torch.distributed``'s functions still sees the calls."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def reduce_scatter_single(output: Tensor, input: Tensor, **kwargs: Any) -> dist.Work | None:
    """``dist.reduce_scatter_single`` (torch 2.13, which deprecates the older name), or on torch 2.11, which
    lacks it, ``dist.reduce_scatter_tensor``: the same collective."""
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input, **kwargs)


def all_gather_single(output: Tensor, input: Tensor, **kwargs: Any) -> dist.Work | None:
    """``dist.all_gather_single`` (torch 2.13), or ``dist.all_gather_into_tensor`` on torch 2.11."""
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, **kwargs)
