"""Overlapped F&B pairs: a chunk's backward run piece by piece, and two jobs run in turns.

DeepSeek-V3 hides the expert all-to-all of one micro-batch under the computation of another: a pair runs
the forward chunk of micro-batch a and the backward chunk of micro-batch b layer by layer, switching from
one to the other whenever an exchange has been started (REFERENCE §5: ``combine(B) → attn(F) → mlp(B) →
dispatch(F) → dispatch(B) → mlp(W) → mlp(F) → attn(B) → attn(W) → combine(F)`` per layer pair).

Both jobs are generators that yield right after starting an exchange; :func:`interleave` runs them in
turns. The forward side is ``Block.forward_phases`` / ``MoE.forward_phases`` (model code). The backward
side needs the forward's graph cut where tokens leave the rank: a monolithic ``autograd.backward`` would
block inside each exchange's backward. :class:`Tape` is the cut (``moe.GraphCut``) recorded during the
forward, and its :meth:`Tape.backward` runs the chunk's backward region by region (region = the part of
the graph between two exchanges), starting each gradient exchange asynchronously and yielding while it is
in flight. Within a region the input gradients are computed first and the weight gradients (the
``ops.wgrad`` store) only after the exchange has been started, as DeepSeek splits mlp(B)/mlp(W) and
attn(B)/attn(W).

Per pair of MoE layers this gives, with the backward first: combine(B) start, [attn(F), counts(F) start,
shared(F), dispatch(F) start], [combine(B) wait, mlp(B), dispatch(B) start, mlp(W)], [dispatch(F) wait,
mlp(F), combine(F) start], [dispatch(B) wait, attn(B), the next combine(B) start, attn(W)], [combine(F)
wait, ...]: DeepSeek's order, except that each exchange starts as soon as its data exists (dispatch(F)
before mlp(B), combine(F) before attn(B)); DeepSeek's launch order follows from the SMs it splits between
communication and compute, which has no counterpart on gloo's threads. The MTP blocks of the last stage
are phased the same way (``TrainingObjective.lm_and_mtp_loss_phases``).

Every cut is exact: a cut tensor's leaf gets the full gradient of its later uses before the region that
produced the tensor is backpropagated, so the gradients equal those of the uncut forward (up to the order
in which autograd sums contributions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator

import torch

from haillm.ops.wgrad import deferring_weight_grads

SendBack = Callable[[torch.Tensor], Callable[[], torch.Tensor]]


class Tape:
    """The graph cuts of one chunk's forward on one micro-batch (implements ``moe.GraphCut``).

    Regions are numbered from 0 in forward order; each :meth:`exchange` closes the current region. A tensor
    passed to ``tape(...)`` is produced in the current region and its leaf may be used only in later ones.
    """

    def __init__(self) -> None:
        self.region = 0
        self.carried: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (region, tensor, its leaf)
        self.exchanges: list[tuple[torch.Tensor, torch.Tensor, SendBack]] = []  # [r]: between r and r+1

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for t in tensors:
            if t.requires_grad:  # a tensor that needs no gradient passes through uncut
                leaf = t.detach().requires_grad_()
                self.carried.append((self.region, t, leaf))
                t = leaf
            out.append(t)
        return tuple(out)

    def exchange(self, sent: torch.Tensor, received: torch.Tensor, send_back: SendBack) -> torch.Tensor:
        leaf = received.detach().requires_grad_(sent.requires_grad)
        self.exchanges.append((sent, leaf, send_back))
        self.region += 1
        return leaf

    def backward(self, roots: list[torch.Tensor], grads: list[torch.Tensor | None],
                 weight_grads: list[Callable[[], None]] | None = None) -> Iterator[None]:
        """Backpropagate ``roots`` (``grads``: None for a scalar loss) through the whole chunk, the last
        region first; yields while a gradient exchange is in flight. ``weight_grads``: collect the deferred
        weight-gradient closures there (an ``I`` action; ``W`` runs them) instead of running them."""
        pending = None  # (sent, wait for its gradient) of the exchange that ends the region below
        for region in range(self.region, -1, -1):
            tensors, region_grads = (list(roots), list(grads)) if region == self.region else ([], [])
            if pending is not None:
                sent, wait = pending
                grad = wait()
                if sent.requires_grad:
                    tensors.append(sent)
                    region_grads.append(grad)
            for r, t, leaf in self.carried:
                if r == region and leaf.grad is not None:
                    tensors.append(t)
                    region_grads.append(leaf.grad)
            defer = weight_grads is not None or region > 0
            with deferring_weight_grads() if defer else contextlib.nullcontext() as queue:
                if tensors:
                    torch.autograd.backward(tensors, region_grads)
            pending = None
            if region > 0:  # start the gradient exchange of the cut below, then do the weight grads
                sent, leaf, send_back = self.exchanges[region - 1]
                pending = sent, send_back(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
            if weight_grads is not None:
                weight_grads.extend(queue)
            else:
                for fn in queue or ():
                    fn()
            if pending is not None:
                yield
        self.carried, self.exchanges = [], []


def interleave(*jobs: Generator) -> None:
    """Run generators in turns, each up to its next yield, until all are done."""
    live = list(jobs)
    while live:
        for job in list(live):
            try:
                next(job)
            except StopIteration:
                live.remove(job)


def run_to_end(job: Generator):
    """Run a generator alone to its end; returns its return value."""
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value
