"""ZeRO-1's forward wait: `ZeroAdamW.step` may return before its parameter all-gathers finish, and each module
waits for the buckets of its own parameters just before it reads them, so the gathers overlap the start of the
next forward (`ZeroAdamW.register_forward_wait`).

A module waits in a forward pre-hook, and before each method named in its `forward_methods` (methods that read
its parameters outside `__call__`, as FSDP2's `register_fsdp_forward_method`: the output head's
`cross_entropy_sum`, a norm's fused FP8 path); such a method waits for every parameter under the module. Code
that reads a parameter any other way must call `ZeroAdamW.wait_params()` first: with NCCL it would read a
half-gathered weight (the tests poison in-flight gathers to catch it).

A module of `regions` (a torch.compile'd region, `haillm.train.compile`) waits for the buckets of all its
parameters, its submodules' included, and its submodules register nothing: their hooks would run inside the
compiled code, where a wait on a collective cannot be traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from haillm.parallel.zero_buckets import Bucket


class ForwardWait:
    """The pre-hooks and method wrappers through which modules wait for their own buckets' gathers."""

    def __init__(self, buckets: Iterable[Bucket], wait: Callable[[Iterable[Bucket]], None]) -> None:
        self._bucket_of = {id(p): b for b in buckets for p in b.params}
        self._wait = wait  # blocks until the given buckets are gathered
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, str]] = []  # (module, method) waiting for its buckets first

    def register(self, model: nn.Module, regions: Iterable[nn.Module] = ()) -> None:
        """Make every module of `model` that owns bucketed parameters wait for their buckets in its forward."""
        regions = list(regions)
        inside = {id(m) for region in regions for m in region.modules() if m is not region}
        whole = {id(m) for m in regions}
        for module in model.modules():
            if id(module) in inside:
                continue
            own = self._buckets_of(module.parameters(recurse=id(module) in whole))
            if own:
                self._hooks.append(module.register_forward_pre_hook(functools.partial(self._pre_hook, own)))
            for name in getattr(module, "forward_methods", ()):
                self._wait_before(module, name, self._buckets_of(module.parameters()))

    def _buckets_of(self, params: Iterable[Tensor]) -> tuple[Bucket, ...]:
        owned = [self._bucket_of[id(p)] for p in params if id(p) in self._bucket_of]
        return tuple({id(b): b for b in owned}.values())

    def _wait_before(self, module: nn.Module, name: str, buckets: tuple[Bucket, ...]) -> None:
        """Shadow `module.<name>` with a wrapper that waits for `buckets` first (`close` removes it)."""
        if not buckets:
            return
        method = getattr(module, name)

        @functools.wraps(method)
        def waiting(*args: Any, **kwargs: Any) -> Any:
            self._wait(buckets)
            return method(*args, **kwargs)

        setattr(module, name, waiting)
        self._wrapped.append((module, name))

    def _pre_hook(self, buckets: tuple[Bucket, ...], module: nn.Module, args: Any) -> None:
        self._wait(buckets)

    def close(self) -> None:
        """Remove the pre-hooks and method wrappers (they hold the optimizer through `wait`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module, name in self._wrapped:
            delattr(module, name)
        self._wrapped.clear()
