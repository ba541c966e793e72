"""Executes any pipeline schedule (1F1B, DualPipe, DualPipeV) on one rank.

The runtime walks the rank's action list from :mod:`schedules`. Where each action gets its input and where
its output goes is derived once by ``derive_routes``; the runtime only moves tensors:

- **P2P** (:mod:`p2p`): every rank posts its transfers in the order ``p2p.p2p_plan`` derives from the
  schedule, so NCCL's matching by posting order pairs each receive with the right tensor (no tags), on one
  communicator per direction of each link. A forward's output is sent when the forward ends, a backward's
  input gradient when its step ends; receives are posted a step ahead into buffers of the known activation
  shape (micro-batch, seq_len, dim), so no shape handshake is needed. Only receives are waited for, right
  before their data is used; sends complete in the background and a sent activation's storage is freed
  once its send is done (autograd keeps the graph).
- **I and W.** ``I`` is an ordinary backward run inside ``ops.wgrad.deferring_weight_grads()``: input
  grads and the gradients of non-deferrable parameters are computed at once, the weight grads of every
  ``ops.Linear`` with ``defer_wgrad`` on (the stage model turns it on for DualPipe/DualPipeV) are queued
  under the action's key, and ``W`` runs that queue. I + W is therefore exactly a full backward. This was
  chosen over "backward w.r.t. the input with retain_graph, then backward w.r.t. the weights at W", which
  is generic but recomputes the whole activation-gradient chain at W (W would cost about as much as B and
  the bubble it fills would be paid twice).
- **Pairs.** Stages with ``forward_phases`` (the DeepSeek-V3 ``StageModel``) run every forward as a
  generator cut at the expert all-to-alls (``overlap.Tape``), and every backward region by region with
  asynchronous gradient exchanges. ``[F&B]`` then interleaves the two halves (:func:`overlap.interleave`,
  backward first): each starts an exchange and hands over to the other, so each all-to-all is in flight
  while the other micro-batch computes. ``overlap=False`` runs the halves back to back on the same cut
  graphs (bitwise the same gradients); stages without ``forward_phases`` always do.
- **Losses.** The last stage of each direction returns the per-micro-batch objective; every stage may add
  its own terms (the MoE balance losses of its layers). Each is backpropagated as ``loss / n_microbatches``,
  exactly like the single-process trainer's gradient accumulation. Metrics are summed over the pipeline
  ranks with one all-reduce, so every rank returns the same step losses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from haillm.parallel.pipeline.overlap import Tape, interleave, run_to_end
from haillm.parallel.pipeline.p2p import LinkGroups, Transfers, p2p_plan
from haillm.parallel.pipeline.schedules import Action, Pair, Route, build, derive_routes


@dataclass
class ChunkOutput:
    """What one chunk's forward on one micro-batch produced.

    ``hidden``: the activation for the next stage (None on the last stage of a pipeline); it must not be a
    view (its storage is freed after it is sent). ``loss``: a scalar to backpropagate with weight
    ``1/n_microbatches`` (the objective on the last stage, plus any stage-local terms such as MoE balance
    losses; None when the stage adds nothing). ``metrics``: detached scalars keyed by ``metric_keys``; they
    are averaged over micro-batches and summed over stages.
    """

    hidden: torch.Tensor | None
    loss: torch.Tensor | None
    metrics: dict[str, torch.Tensor]


class PipelineStages(Protocol):
    """The modules one rank runs, one per local chunk (``StageModel`` for DeepSeek-V3).

    Optionally also ``forward_phases(chunk, x, batch, cut) -> Generator[None, None, ChunkOutput]``: the
    forward as a generator that yields while tokens are in flight and cuts its graph there through ``cut``
    (``moe.GraphCut``); the runtime then overlaps F&B pairs.
    """

    metric_keys: tuple[str, ...]

    def forward_chunk(self, chunk: int, x: torch.Tensor | None, batch: Any) -> ChunkOutput:
        """``x`` is None on a pipeline's first stage (read the inputs from ``batch``)."""
        ...

    def activation_shape(self, batch: Any) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the hidden state passed between stages for a micro-batch like ``batch``."""
        ...


@dataclass
class StepLosses:
    """Per-step results, identical on every pipeline rank.

    ``mean[key]``: the micro-batch average, computed like the trainer's accumulation (``sum(v / n)``).
    ``per_microbatch``: ``[len(keys), n]`` float64, column k for global micro-batch k.
    """

    mean: dict[str, float]
    per_microbatch: torch.Tensor


def _free_after_send(t: torch.Tensor) -> bool:
    """True when ``t``'s storage can be dropped once sent: it is not a view and its own grad_fn did not
    save it (ops like sigmoid keep their result for backward; a custom Function through save_for_backward).
    Autograd needs only its shape and graph. Views are kept: their base may be in use elsewhere."""
    node = t.grad_fn
    if t._base is not None or node is None:
        return t._base is None
    saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        saved += list(node.saved_tensors)
    ptr = t.untyped_storage().data_ptr()
    return not any(isinstance(s, torch.Tensor) and s.untyped_storage().data_ptr() == ptr for s in saved)


class PipelineRuntime:
    """Runs the schedule ``name`` for this rank of a pipeline of ``pp`` ranks (``pp_group``, or None for one
    process) with ``n_microbatches`` per step. ``stages`` holds this rank's chunks in the schedule's chunk
    order (``schedules.topology``). ``links``: the groups carrying the transfers (``LinkGroups.create`` for
    every pipeline of the job); made here from ``pp_group`` when it is the whole world."""

    def __init__(self, stages: PipelineStages, name: str, n_microbatches: int,
                 pp_group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 overlap: bool = True, links: LinkGroups | None = None):
        self.stages, self.name, self.n, self.overlap = stages, name, n_microbatches, overlap
        self.device = torch.device(device)
        self.group = pp_group
        pp = dist.get_world_size(pp_group) if pp_group is not None else 1
        self.rank = dist.get_rank(pp_group) if pp_group is not None else 0
        if links is None and pp > 1:
            if pp != dist.get_world_size():
                raise ValueError("a pipeline smaller than the world needs links=LinkGroups.create(...) for every "
                                 "pipeline, made by every rank")
            links = LinkGroups.create([dist.get_process_group_ranks(pp_group)])
        self.links = links
        schedule, self.topo = build(name, pp, n_microbatches)
        self.steps = schedule[self.rank]
        self.routes = derive_routes(schedule, self.topo)[self.rank]
        plan = p2p_plan(schedule, self.topo)
        self.plan_sends, self.plan_receives = plan.sends[self.rank], plan.receives[self.rank]
        self.posted: Counter[tuple[str, int]] = Counter()

    def p2p_posted(self) -> dict[str, dict[int, int]]:
        """Transfers posted since the start, {"send"|"recv": {global peer rank: count}}: two ranks' counts of
        the transfers between them are equal unless one waits for the other (haillm.train.watchdog)."""
        out: dict[str, dict[int, int]] = {"send": {}, "recv": {}}
        for (direction, peer), count in list(self.posted.items()):
            out[direction][peer] = count
        return out

    def global_microbatch(self, action: Action) -> int:
        """Index into the step's micro-batch list: DualPipe feeds the first half from rank 0 (pipeline 0)
        and the second half from the last rank (pipeline 1)."""
        pipeline = self.topo.stage(self.rank, action.chunk).pipeline
        return pipeline * (self.n // 2) + action.microbatch

    def step(self, micro_batches: list[Any]) -> StepLosses:
        """Forward and backward of one step's micro-batches; accumulates into ``.grad`` (never zeroes it).

        Every rank of the pipeline passes the same list; a rank reads only the micro-batches of the stages
        it holds (first stage: inputs; last stage: inputs and targets).
        """
        if len(micro_batches) != self.n:
            raise ValueError(f"the runtime was built for {self.n} micro-batches, got {len(micro_batches)}")
        self.batches = micro_batches
        self.shape, self.dtype = self.stages.activation_shape(micro_batches[0])
        self.p2p = Transfers(self.links, self.posted, self.plan_sends) if self.links is not None else None
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                                Tape]] = {}
        self.local: dict[tuple[bool, int, int], torch.Tensor] = {}  # same-rank hand-offs (the V turn)
        self.deferred: dict[tuple[int, int], list] = {}
        self.metric_parts: list[tuple[int, int, torch.Tensor]] = []  # (key row, micro-batch, value)
        self.outbox: list[tuple[torch.Tensor, tuple, int]] = []  # input gradients, sent when their step ends
        for i, (step, routes) in enumerate(zip(self.steps, self.routes, strict=True)):
            for transfer in self.plan_receives[i]:
                self.p2p.recv(transfer, torch.empty(self.shape, dtype=self.dtype, device=self.device))
            if isinstance(step, Pair):
                self._pair(step, routes)
            elif step.kind == "F":
                run_to_end(self._forward(step, routes[0]))
            elif step.kind == "W":
                for fn in self.deferred.pop((step.chunk, step.microbatch)):
                    fn()
            else:
                run_to_end(self._backward(step, routes[0]))
            for grad, key, peer in self.outbox:
                self.p2p.send(grad, key, peer, free=False)
            self.outbox.clear()
        if self.p2p is not None:
            self.p2p.finish()
        if self.saved or self.deferred or self.local:
            raise RuntimeError("pipeline step ended with unconsumed activations, gradients or weight grads")
        self.batches = []
        return self._reduce_metrics()

    # --- compute halves --------------------------------------------------------------------------------

    def _transfer_key(self, grad: bool, producer_rank: int, producer_chunk: int, microbatch: int) -> tuple:
        return grad, self.topo.stage(producer_rank, producer_chunk), microbatch

    def _forward(self, action: Action, route: Route) -> Iterator[None]:
        key = (action.chunk, action.microbatch)
        if route.src is None:
            x = None
        elif route.src.rank == self.rank:
            x = self.local.pop((False, *key))
        else:
            x = self.p2p.take(self._transfer_key(False, route.src.rank, route.src.chunk, action.microbatch))
            x.requires_grad_()
        k = self.global_microbatch(action)
        tape = Tape()
        if hasattr(self.stages, "forward_phases"):
            out = yield from self.stages.forward_phases(action.chunk, x, self.batches[k], tape)
        else:
            out = self.stages.forward_chunk(action.chunk, x, self.batches[k])
        for row, name in enumerate(self.stages.metric_keys):
            if name in out.metrics:
                self.metric_parts.append((row, k, out.metrics[name]))
        if (route.dst is None) != (out.hidden is None):
            raise RuntimeError(f"chunk {action.chunk}: a hidden state is returned iff the stage is not last")
        self.saved[key] = (x, out.hidden, out.loss, tape)
        if route.dst is None:
            return
        if route.dst.rank == self.rank:
            self.local[(False, route.dst.chunk, action.microbatch)] = out.hidden.detach().requires_grad_()
        else:  # at once: in a pair, the backward half may run on for a while. Detached: until the send is
            # reaped, the transfer list must not hold the chunk's graph (with its input) past its backward
            self.p2p.send(out.hidden.detach(), self._transfer_key(False, self.rank, action.chunk, action.microbatch),
                          route.dst.rank, free=_free_after_send(out.hidden))

    def _backward(self, action: Action, route: Route) -> Iterator[None]:
        key = (action.chunk, action.microbatch)
        x, hidden, loss, tape = self.saved.pop(key)
        tensors, grads = [], []
        if hidden is not None:
            if route.src.rank == self.rank:
                grad = self.local.pop((True, *key))
            else:
                grad = self.p2p.take(self._transfer_key(True, route.src.rank, route.src.chunk, action.microbatch))
            tensors.append(hidden)
            grads.append(grad)
        if loss is not None:
            tensors.append(loss / self.n)
            grads.append(None)
        queue = [] if action.kind == "I" else None
        yield from tape.backward(tensors, grads, queue)
        if queue is not None:
            self.deferred[key] = queue
        if route.dst is None:
            return
        if x.grad is None:
            raise RuntimeError(f"chunk {action.chunk}: the stage output does not depend on its input")
        if route.dst.rank == self.rank:
            self.local[(True, route.dst.chunk, action.microbatch)] = x.grad
        else:  # when the step ends: after a pair's forward output (the order p2p_plan gives the receiver)
            self.outbox.append((x.grad, self._transfer_key(True, self.rank, action.chunk, action.microbatch),
                                route.dst.rank))

    def _pair(self, pair: Pair, routes: tuple[Route, Route]) -> None:
        """An overlapped F&B step: the halves in turns, switching at each started all-to-all, the backward
        first when it has exchanges (its combine gradients travel while the forward runs attention, as in
        DeepSeek's order), else the forward (its output is sent sooner); or F then B (``overlap`` off).
        Both inputs were sent before the pair began, as in DeepSeek's DualPipe."""
        forward = self._forward(pair.forward, routes[0])
        backward = self._backward(pair.backward, routes[1])
        if not self.overlap:
            run_to_end(forward)
            run_to_end(backward)
        elif self.saved[(pair.backward.chunk, pair.backward.microbatch)][3].exchanges:
            interleave(backward, forward)
        else:
            interleave(forward, backward)

    def _reduce_metrics(self) -> StepLosses:
        """One all-reduce of every (key, micro-batch) value over the pipeline, in float64."""
        metrics = torch.zeros(len(self.stages.metric_keys), self.n, dtype=torch.float64, device=self.device)
        for row, k, value in self.metric_parts:
            metrics[row, k] += value.to(self.device, torch.float64)
        if self.group is not None:
            dist.all_reduce(metrics, group=self.group)
        metrics = metrics.cpu()
        mean = {name: sum(v / self.n for v in row.tolist())
                for name, row in zip(self.stages.metric_keys, metrics, strict=True)}
        return StepLosses(mean, metrics)
