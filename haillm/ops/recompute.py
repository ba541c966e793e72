"""Recomputing cheap outputs in backward instead of keeping them (DeepSeek-V3 report §3.2.3: all RMSNorm
outputs and the MLA up-projections).

A tensor marked by :func:`recomputable` (or :func:`mark`) is not stored by the ops that save it for
backward while :func:`keeping_recipes` is active: they store its recipe instead, and the first unpack in
backward recomputes it under ``no_grad`` (once, shared by every op that saved it). Only the consumers'
copies go: the producing ops' own backward is untouched, so a recipe's inputs must be tensors autograd
keeps anyway (a norm's input, the latents) for the saving to be real. Recomputation is deterministic, so
gradients are bitwise those of a run without it.

Unlike ``torch.utils.checkpoint`` this drops outputs consumed by ops outside the recomputed region (the
q, k, v that attention saves) without recomputing the consumers, and it has no region that could be left
open across a yield of the pipeline's overlapped F&B pairs: recipes live on tensors, and the saving hook
is entered per forward step (:func:`stepwise`).

Inside a ``torch.compile``d region (``haillm.train.compile``) a tensor cannot carry a recipe: the compiled
backward saves what its partitioner chose. There :func:`recomputable` encloses ``fn`` in a
``torch.utils.checkpoint`` region, which the partitioner recomputes in backward (same values, same
memory saving), and :func:`mark` does nothing: the partitioner itself recomputes norms and pointwise ops
rather than keep their outputs. A region's inputs and outputs are ordinary tensors and keep their recipes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

_TAG = "_haillm_recipe"
_VIEW_TAG = "_haillm_recipe_of_view"  # on the base of a marked view that covers it (views of it are its views)


class _Recipe:
    """One call ``fn(*args)``, recomputed at most once; ``index`` picks an output of a tuple result."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args, self.value = fn, args, None

    def output(self, index: int | None) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn(*(a.unpack() if isinstance(a, _Source) else a for a in self.args))
        return self.value if index is None else self.value[index]


class _Source:
    """A marked tensor as a recipe's argument: its own recipe, so that holding it keeps nothing alive."""

    def __init__(self, tag: tuple[_Recipe, int | None]) -> None:
        self.tag = tag

    def unpack(self) -> torch.Tensor:
        return _unpack(self.tag)


def source(t: torch.Tensor) -> torch.Tensor | _Source:
    """``t`` as an argument of a recipe (``mark``, ``mark_outputs``): where ``t`` is itself marked, a reference
    to its recipe instead of to ``t`` (which would keep it alive for backward)."""
    tag = getattr(t, _TAG, None)
    return t if tag is None else _Source(tag)


def _tag(t: torch.Tensor, tag: tuple[_Recipe, int | None]) -> None:
    """Mark ``t``; where ``t`` is a contiguous view covering its whole base (``act_quant``'s outputs are), the
    base too, since a view of ``t`` that an op saves has the base, not ``t``, as its ``_base``."""
    setattr(t, _TAG, tag)
    base = t._base
    if (base is not None and t.is_contiguous() and base.is_contiguous() and t.numel() == base.numel()
            and t.storage_offset() == base.storage_offset()):
        setattr(base, _VIEW_TAG, tag)


def mark(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Declare ``out == fn(*args)`` so that saving ``out`` for backward stores the recipe; returns ``out``."""
    if torch.compiler.is_compiling():
        return out
    _tag(out, (_Recipe(fn, args), None))
    return out


def mark_outputs(outs: tuple[torch.Tensor, ...], fn: Callable[..., tuple[torch.Tensor, ...]], *args: Any) -> None:
    """Declare ``outs == fn(*args)`` (a tuple): saving any of them stores the one recipe they share, which
    backward runs at most once."""
    if torch.compiler.is_compiling():
        return
    recipe = _Recipe(fn, args)
    for i, t in enumerate(outs):
        _tag(t, (recipe, i))


def recomputable(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (a tensor or a tuple of tensors) with every output marked for recomputation."""
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    out = fn(*args)
    if isinstance(out, tuple):
        mark_outputs(out, fn, *args)
        return out
    return mark(out, fn, *args)


class _View:
    """A saved view of a marked contiguous tensor (``F.linear`` on a 3-D input saves its 2-D reshape):
    rebuilt on the recomputed tensor from its geometry."""

    def __init__(self, tag: tuple[_Recipe, int | None], t: torch.Tensor, base: torch.Tensor) -> None:
        self.tag, self.size, self.stride = tag, t.size(), t.stride()
        self.offset = t.storage_offset() - base.storage_offset()

    def unpack(self) -> torch.Tensor:
        recipe, index = self.tag
        base = recipe.output(index)
        if not base.is_contiguous():  # the geometry was taken on a contiguous original
            raise RuntimeError("a recomputed tensor is not contiguous; cannot rebuild a saved view of it")
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


def _pack(t: torch.Tensor) -> Any:
    tag = getattr(t, _TAG, None)
    if tag is not None:
        return tag
    base = t._base
    if base is not None and base.is_contiguous():
        tag = getattr(base, _TAG, None) or getattr(base, _VIEW_TAG, None)
        if tag is not None:
            return _View(tag, t, base)
    return t


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, _View):
        return packed.unpack()
    recipe, index = packed
    return recipe.output(index)


@contextlib.contextmanager
def keeping_recipes() -> Iterator[None]:
    """Within the block, ops that save a marked tensor for backward keep its recipe instead."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def stepwise(context: Callable[[], contextlib.AbstractContextManager], job: Generator) -> Generator:
    """Run each step of the generator ``job`` inside a fresh ``context()``, never across its yields (the
    other job of an overlapped pair runs there); returns ``job``'s return value."""
    while True:
        with context():
            try:
                next(job)
            except StopIteration as stop:
                return stop.value
        yield
