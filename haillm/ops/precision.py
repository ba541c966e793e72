"""Low-precision GEMMs that run everywhere: on a GPU the native BF16 kernels, on a CPU the same numerics
with fp32 arithmetic.

A BF16 GEMM on a GPU reads bf16 operands, accumulates in fp32 and rounds the result to bf16. Many CPUs have
no fast bf16 matmul (../shared/MACHINE.md measured 340x slower than fp32 on one of our test machines), so
on CPU the operands, already bf16, are widened to fp32, multiplied, and the result rounded back to bf16:
the GPU's arithmetic up to the order of the fp32 additions. Autograd runs through the casts, so the
backward GEMMs get the same treatment (their bf16 inputs widened, their results rounded to the
parameter's or activation's dtype). On a GPU, and for fp32 tensors anywhere, these are the plain ops.

What backward keeps is what a GPU keeps: the bf16 operands, not their fp32 copies (``_KeepNarrow``). While
the fp32 op runs, a saved-tensor hook replaces every tensor autograd saves that is (a view of) one of the
fp32 up-casts by the bf16 tensor it was made from, and backward up-casts it again: the same fp32 values in
the same layout, so the backward formulas are autograd's own and the gradients are bitwise those of keeping
the copies. Other saved tensors are kept as they are: attention's fp32 output and log-sum-exp (its backward
reads the output, so rounding it would change the gradients), and a copy the fp32 op makes of an up-cast
itself (``F.linear`` flattening a >2-D input whose leading dims cannot be viewed flat; the model's inputs
can). An enclosing saved-tensor hook (activation recomputation, a memory probe, a checkpoint region) still
sees every saved tensor, the bf16 operand in place of its up-cast. In a ``torch.compile``d region the
partitioner chooses what is kept, so there the plain emulation runs. Extra work: one up-cast per saved
operand in backward (the GEMM reads that many elements anyway).

Every GEMM of the model whose operands may be bf16 goes through here; the choice depends only on the
device, never on a CPU measurement, so nothing decided here changes what a GPU runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from haillm.ops.recompute import mark

LOW_PRECISION = (torch.bfloat16, torch.float16)


def widens(*tensors: torch.Tensor | None) -> bool:
    """True when a GEMM over ``tensors`` runs emulated: on CPU with any operand in bf16 or fp16."""
    return any(t is not None and t.device.type == "cpu" and t.dtype in LOW_PRECISION for t in tensors)


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class _Narrow:
    """A saved fp32 tensor that is (a view of) the up-cast of a low-precision ``source``: the source as the
    enclosing hook packed it, its version, and the geometry of the up-cast and of the saved view."""

    __slots__ = ("owner", "packed", "version", "wide_size", "wide_stride", "size", "stride", "offset")

    def __init__(self, owner: _KeepNarrow, packed: Any, version: int, wide: torch.Tensor, t: torch.Tensor) -> None:
        self.owner, self.packed, self.version = owner, packed, version
        self.wide_size, self.wide_stride = wide.size(), wide.stride()
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset() - wide.storage_offset()

    def unpack(self, outer_unpack: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
        if isinstance(self.packed, torch.Tensor) and self.packed._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a {self.packed.dtype} operand of an emulated GEMM (haillm.ops.precision) is at version "
                f"{self.packed._version}; expected version {self.version} instead.")
        source = self.packed if outer_unpack is None else outer_unpack(self.packed)
        wide = source.float()  # the forward's up-cast again: same function of the same tensor, same layout
        if wide.stride() != self.wide_stride:  # the enclosing hook gave the source back in another layout
            wide = torch.empty_strided(self.wide_size, self.wide_stride, dtype=wide.dtype, device=wide.device)
            wide.copy_(source)
        if self.size == self.wide_size and self.stride == self.wide_stride and self.offset == 0:
            return wide
        return wide.as_strided(self.size, self.stride, wide.storage_offset() + self.offset)


class _KeepNarrow(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep, for each ``wide`` up-cast of a low-precision operand (or a view of it),
    the operand instead (see the module docstring); every other saved tensor goes to the enclosing hooks."""

    def __init__(self, operands: tuple[torch.Tensor | None, ...], wide: list[torch.Tensor | None]) -> None:
        self.sources = {
            w.untyped_storage().data_ptr(): (w, t)
            for t, w in zip(operands, wide, strict=True)
            if t is not None and t.dtype in LOW_PRECISION and w.numel()
        }
        outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)
        super().__init__(self._pack, self._unpack)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        # Saved _Narrows point here (owner): the up-casts must not outlive the op (backward makes its own).
        self.sources = None

    def _pack(self, t: torch.Tensor) -> Any:
        source = self.sources.get(t.untyped_storage().data_ptr()) if t.dtype == torch.float32 and t.numel() else None
        if source is None:
            return t if self.outer_pack is None else self.outer_pack(t)
        wide, narrow = source
        packed = narrow if self.outer_pack is None else self.outer_pack(narrow)
        return _Narrow(self, packed, narrow._version, wide, t)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is _Narrow and packed.owner is self:
            return packed.unpack(self.outer_unpack)
        return packed if self.outer_unpack is None else self.outer_unpack(packed)


def _keeps_narrow(operands: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether ``_emulated`` installs ``_KeepNarrow``: where autograd records the op (grad mode on, an
    operand requiring grad), outside compiled regions, and unless saved-tensor hooks are disabled."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)
            and not torch.compiler.is_compiling() and torch._C._autograd._saved_tensors_hooks_is_enabled())


def _emulated(op: Callable[..., torch.Tensor], *operands: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """``op`` on the fp32 up-casts of ``operands``, backward keeping the operands themselves."""
    wide = [_wide(t) for t in operands]
    if not _keeps_narrow(operands):
        return op(*wide, **kwargs)
    with _KeepNarrow(operands, wide):
        return op(*wide, **kwargs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in the inputs' dtype (bf16 on CPU: fp32 arithmetic, result rounded to ``x.dtype``)."""
    if not widens(x, weight, bias):
        return F.linear(x, weight, bias)
    return _emulated(F.linear, x, weight, bias).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in ``a``'s dtype (bf16 on CPU: fp32 arithmetic)."""
    if not widens(a, b):
        return a @ b
    return _emulated(torch.matmul, a, b).to(a.dtype)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (2-D) in ``a``'s dtype, into ``out`` when given; no autograd through ``out``."""
    if not widens(a, b):
        return torch.mm(a, b, out=out)
    if out is not None:
        return out.copy_(torch.mm(a.float(), b.float()))
    return _emulated(torch.mm, a, b).to(a.dtype)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` in ``a``'s dtype (bf16 on CPU: fp32 arithmetic)."""
    if not widens(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    return _emulated(torch._grouped_mm, a, b, offs=offs).to(a.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal ``F.scaled_dot_product_attention`` in ``q``'s dtype (bf16 on CPU: fp32 arithmetic; backward
    keeps the bf16 q, k, v, and the fp32 output and log-sum-exp that the fp32 kernel's backward reads)."""
    if not widens(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = _emulated(F.scaled_dot_product_attention, q, k, v, is_causal=True, scale=scale)
    return mark(out.to(q.dtype), out.to, q.dtype)  # a recipe from the kept fp32 output, for its consumers


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters (not buffers: the gate's balancing bias, load counters and rope tables stay fp32) to
    ``dtype``, in place; the compute copy of mixed-precision training. Returns ``module``."""
    for p in module.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def apply_like_autocast(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)`` as autocast runs a low-precision op: when autocast is on for the inputs'
    device, floating tensors are cast to its dtype and the Function runs with autocast off (its backward
    must be wrapped in ``autocast_off`` too, since a backward called inside an autocast block runs under it).
    Without autocast, plain ``apply``: the Function then works in its inputs' own dtypes."""
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if not torch.is_autocast_enabled(device):
        return function.apply(*args)
    dtype = torch.get_autocast_dtype(device)
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device, enabled=False):
        return function.apply(*args)


def autocast_off(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for an autograd Function's ``backward``: run it with autocast off on the gradients' device,
    so its GEMMs keep the dtypes forward chose (see ``apply_like_autocast``)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: torch.Tensor | None) -> Any:
        device = next(g.device.type for g in grads if isinstance(g, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return wrapped
