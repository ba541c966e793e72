"""Attention over key blocks, one block at a time: each block's output and log-sum-exp from the fused kernel,
merged exactly into the output over all blocks; in backward, each block's gradients from the fused kernel
given the merged output and log-sum-exp (FlashAttention's own backward, which needs nothing block-local).

Context parallelism (``haillm.parallel.context``) attends a rank's queries to key blocks that exist one at a
time: this is the arithmetic it needs. A block pair is either fully visible (``causal=False``) or on the
diagonal (``causal=True``: square, query i sees keys 0..i); blocks above the diagonal are never called.

The kernels are the ones ``F.scaled_dot_product_attention`` dispatches to: FlashAttention's CPU kernel, and
on CUDA the memory-efficient kernel (it takes a value head dim other than the query's). ``math`` is the
plain formula, the reference the tests hold the kernels to. Low-precision inputs on CPU run in fp32
(``haillm.ops.precision``'s emulation of a BF16 GPU kernel: fp32 arithmetic, the output rounded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from haillm.ops.precision import widens


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    scores = (_wide(q) @ _wide(k).transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    scores = _scores(q, k, causal, scale)
    lse = scores.logsumexp(dim=-1)
    return ((scores - lse[..., None]).exp() @ _wide(v)).to(q.dtype), lse


def _math_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    qf, kf, vf, dof = _wide(q), _wide(k), _wide(v), _wide(do)
    scores = _scores(qf, kf, causal, scale)
    probs = (scores - lse[..., None]).exp()
    delta = (dof * _wide(o)).sum(dim=-1, keepdim=True)
    dscores = probs * (dof @ vf.transpose(-1, -2) - delta) * scale
    return (dscores @ kf).to(q.dtype), (dscores.transpose(-1, -2) @ qf).to(k.dtype), \
        (probs.transpose(-1, -2) @ dof).to(v.dtype)


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, kernel: str = "fused"
                  ) -> tuple[Tensor, Tensor]:
    """``(o, lse)`` of ``q: [B, H, Tq, d]`` against one key block ``k: [B, H, Tk, d]``, ``v: [B, H, Tk, dv]``:
    ``o`` in the kernel's dtype (fp32 for emulated low precision), ``lse: [B, H, Tq]`` in fp32 (fp64 for fp64)."""
    if kernel == "math":
        return _math_forward(q, k, v, causal, scale)
    if q.device.type == "cuda":
        o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        return o, lse[..., : q.shape[2]].float()
    if widens(q, k, v):
        q, k, v = q.float(), k.float(), v.float()
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def block_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float,
                   kernel: str = "fused") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block's ``q, k, v`` given the gradient ``do`` of the output merged over all blocks, that
    output ``o`` and its ``lse`` (as ``merge_`` left them); in ``q``/``k``/``v``'s dtypes."""
    if kernel == "math":
        return _math_backward(do, q, k, v, o, lse, causal, scale)
    if q.device.type == "cuda":
        padded = lse.new_zeros((*lse.shape[:-1], -(-lse.shape[-1] // 32) * 32))  # the kernel's lse rows
        padded[..., : lse.shape[-1]] = lse
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do.to(q.dtype), q, k, v, None, o.to(q.dtype), padded, seed, offset, 0.0, [True, True, True, False],
            causal, scale=scale)
        return dq, dk, dv
    dtypes = q.dtype, k.dtype, v.dtype
    if widens(q, k, v):
        q, k, v = q.float(), k.float(), v.float()
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.to(q.dtype).contiguous(), q, k, v, o.to(q.dtype), lse.to(q.dtype),
        0.0, causal, scale=scale)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def merge_(o: Tensor | None, lse: Tensor | None, o_block: Tensor, lse_block: Tensor) -> tuple[Tensor, Tensor]:
    """The output and log-sum-exp over the blocks so far and one more: ``o`` (fp32 or wider, updated in place;
    None before the first block) is the softmax-weighted mean of the blocks' outputs by their ``exp(lse)``."""
    if o is None:
        return _wide(o_block).clone(), lse_block.clone()
    total = torch.logaddexp(lse, lse_block)
    o.mul_((lse - total).exp()[..., None]).add_((lse_block - total).exp()[..., None] * o_block.to(o.dtype))
    return o, total
