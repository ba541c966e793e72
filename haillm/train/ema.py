"""An exponential moving average (EMA) of the parameters, kept in host memory (`train.ema_decay`).

DeepSeek-V3 (section 3.3.3) keeps an EMA of the model's parameters in CPU memory, updated asynchronously after
each training step: an early estimate of the model after learning-rate decay, for no GPU memory and almost no
step time. Here each rank averages the parameters its own model holds (its pipeline stages, its block of experts;
with ZeRO-1 every data-parallel replica holds them all after the step), under the names of ``model.state_dict()``:
full-model FQNs, experts by global id. A checkpoint stores the EMA as ``ema.<fqn>`` next to ``model.<fqn>`` (a
tensor-parallel block in its whole tensor's shape), so it reshards across layouts as the weights do. Buffers (the
routing bias) are not parameters and are not averaged.

One update, after an optimizer step that was applied (a skipped step adds no point to the average):
  1. the parameters are copied into host staging buffers -- on a GPU by ``non_blocking`` copies into pinned
     memory on a side stream, which waits for the optimizer's work, so the training thread does not wait;
  2. a background thread (waiting for the copies' event on a GPU) blends the staged values into the fp32 EMA:
     ``ema = decay * ema + (1 - decay) * param``, as three separately rounded elementwise operations, so the
     result is bitwise that of the plain torch expression whatever the threads or vector width.
On CPU the copy is synchronous; the blend runs on the same background thread. Whoever reads the EMA
(``state_dict``: checkpoints, export) waits for the update in flight first (``wait``), and the next optimizer step
must not overwrite the parameters before step 1 has read them (``before_optimizer_step``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from haillm.parallel.zero_state import Block, copy_pieces, in_blocks


def parameter_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that are parameters, not buffers (per-expert views of the stacked
    expert weights included), detached, in state-dict order."""
    buffers = {name for name, _ in model.named_buffers()}
    return {key: t.detach() for key, t in model.state_dict().items() if key not in buffers}


def parameter_keys(model: nn.Module) -> list[str]:
    """The keys of ``model.state_dict()`` that hold parameters: what the EMA averages and checkpoints."""
    return list(parameter_views(model))


class ParameterEMA:
    """fp32 host-memory EMA of this rank's parameters, keyed as in ``model.state_dict()``.

    A ``Stateful`` for torch.distributed.checkpoint: ``state_dict()`` (after ``wait()``) is the EMA tensors
    themselves, which DCP loads in place; ``restored`` says whether the last checkpoint load filled them.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.restored = False  # set by haillm.train.checkpoint.load: the EMA came from the checkpoint
        self._views_key: tuple[int, ...] | None = None  # the parameters' storage when _views_cache was built
        self._views_cache: dict[str, torch.Tensor] = {}
        views = self._views()
        cuda = any(t.is_cuda for t in views.values())  # then pinned host memory: asynchronous copies
        self.ema = {k: torch.empty(t.shape, dtype=torch.float32, pin_memory=cuda) for k, t in views.items()}
        # staged copies of the parameters in their own dtype (a bf16 model copies half the bytes)
        self._staging = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for k, t in views.items()}
        largest = max((t.numel() for t in views.values()), default=0)
        self._scratch = torch.empty(largest, dtype=torch.float32)  # (1 - decay) * param, one tensor at a time
        self._stream = torch.cuda.Stream(device=next(t for t in views.values() if t.is_cuda).device) if cuda else None
        self._copied: torch.cuda.Event | None = None
        self._pool: ThreadPoolExecutor | None = None  # the blending thread, started at the first update
        self._pending: Future | None = None
        self.bytes = sum(t.numel() * t.element_size() for d in (self.ema, self._staging) for t in d.values())
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average from the current parameters (a new run, or a checkpoint saved without an EMA).
        The caller makes sure the parameters are complete (ZeRO-1: ``optimizer.wait_params()``)."""
        self.wait()
        for key, param in self._views().items():
            self.ema[key].copy_(param)

    @torch.no_grad()
    def update(self, params_ready: Callable[[], None] | None = None) -> None:
        """Fold the current parameters into the average, in the background (see the module docstring).
        ``params_ready`` orders the current stream after whatever completes the parameters (ZeRO-1's
        ``order_after_gathers``); it is called on the copies' side stream, so the training stream does not
        wait for all gathers at once (it keeps waiting bucket by bucket in the next forward)."""
        self.wait()  # the previous blend has read the staging buffers
        views = self._views()
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            with torch.cuda.stream(self._stream):
                if params_ready is not None:
                    params_ready()
                for key, param in views.items():
                    self._staging[key].copy_(param, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record(self._stream)
        else:
            if params_ready is not None:
                params_ready()
            for key, param in views.items():
                self._staging[key].copy_(param)
        if self._pool is None:  # first update, or closed at the end of a previous fit()
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="haillm-ema")
        self._pending = self._pool.submit(self._blend, self._copied)

    def _blend(self, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        keep, take = self.decay, 1.0 - self.decay
        with torch.no_grad():
            for key, ema in self.ema.items():
                scratch = self._scratch[: ema.numel()].view(ema.shape)
                scratch.copy_(self._staging[key]).mul_(take)  # exact up-cast, then one rounding
                ema.mul_(keep).add_(scratch)

    def _views(self) -> dict[str, torch.Tensor]:
        """``parameter_views(model)``, built again only when a parameter's storage moved (ZeRO-1 puts them in
        its buckets): not ``model.state_dict()`` on every step."""
        key = tuple(p.data_ptr() for p in self.model.parameters())
        if key != self._views_key:
            self._views_cache, self._views_key = parameter_views(self.model), key
        return self._views_cache

    def before_optimizer_step(self) -> None:
        """Let the optimizer overwrite the parameters only after the last update copied them: on a GPU the
        current stream waits for the copies' event (no host wait; they had a whole step to finish)."""
        if self._copied is not None and self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._copied)

    def wait(self) -> None:
        """Block until the update in flight is blended in (re-raises its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the update in flight and stop the background thread."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- torch.distributed.checkpoint ----
    def state_dict(self, blocks: Mapping[str, Block] | None = None) -> dict[str, torch.Tensor]:
        """The EMA tensors by state-dict key, complete (DCP saves them, or loads into them in place); those named
        in `blocks` (a tensor-parallel block of a parameter) as views in their whole tensor's shape."""
        self.wait()
        return in_blocks(self.ema, blocks or {})

    def load_state_dict(self, state: dict[str, torch.Tensor], blocks: Mapping[str, Block] | None = None) -> None:
        """Adopt a loaded EMA (DCP filled ``state_dict(blocks)``'s tensors in place; a copy otherwise)."""
        for key, ema in self.state_dict(blocks).items():
            copy_pieces(ema, state[key], key)
