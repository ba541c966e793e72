"""Functions that compiled regions run eagerly, at a graph break, marked without importing dynamo.

``torch.compiler.disable`` imports ``torch._dynamo``, with sympy and, where it is installed, Triton: about
1.5 s of CPU for every process that imports haillm (each rank of a launch, every command-line tool). Only a
run that compiles needs it. So ``@eager_in_compiled_regions`` only records a function, and the first
compiled region (``haillm.train.compile``) calls ``apply_graph_breaks``, which puts the function's
``torch.compiler.disable`` wrapper wherever haillm's loaded modules hold it: a module-level name (also one
imported with ``from ... import``) or a class attribute (a method). A function marked after that is wrapped
at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

_marked: list[Callable] = []
_applied = False


def eager_in_compiled_regions(fn: F) -> F:
    """``torch.compiler.disable(fn)`` from the first compiled region on; ``fn`` itself until then."""
    if _applied:
        return torch.compiler.disable(fn)
    _marked.append(fn)
    return fn


def apply_graph_breaks() -> None:
    """Replace every marked function by its ``torch.compiler.disable`` wrapper in haillm's loaded modules."""
    global _applied
    if _applied:
        return
    wrapped = {id(fn): torch.compiler.disable(fn) for fn in _marked}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "haillm" or name.startswith("haillm.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in wrapped:
                setattr(module, attr, wrapped[id(value)])
            elif isinstance(value, type) and value.__module__ == name:
                for member, fn in list(vars(value).items()):
                    if id(fn) in wrapped:
                        setattr(value, member, wrapped[id(fn)])
    _marked.clear()
    _applied = True
