"""Blockwise attention (haillm.ops.block_attention) against one causal attention over the whole sequence."""

import pytest
import torch
import torch.nn.functional as F

from haillm.ops.block_attention import block_backward, block_forward, merge_


def _blockwise(q, k, v, n_blocks, scale, kernel):
    """Causal attention of every query block against its visible key blocks, merged; then every block's
    gradients for ``do`` from the merged output and lse."""
    qs, ks, vs = (t.chunk(n_blocks, dim=2) for t in (q, k, v))
    outs = []
    for i, qi in enumerate(qs):
        o = lse = None
        for j in range(i + 1):
            o, lse = merge_(o, lse, *block_forward(qi, ks[j], vs[j], j == i, scale, kernel))
        outs.append((o, lse))
    return qs, ks, vs, outs


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_merge_to_whole_attention(kernel, dtype):
    torch.manual_seed(0)
    B, H, T, d, dv, scale, n_blocks = 2, 3, 48, 16, 8, 0.3, 4
    q, k = torch.randn(B, H, T, d, dtype=dtype), torch.randn(B, H, T, d, dtype=dtype)
    v = torch.randn(B, H, T, dv if kernel == "math" else d, dtype=dtype)
    do = torch.randn(B, H, T, v.shape[-1], dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
    ref.backward(do)

    qs, ks, vs, outs = _blockwise(q, k, v, n_blocks, scale, kernel)
    out = torch.cat([o for o, _ in outs], dim=2).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol)

    dq, dk, dv_ = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    c = T // n_blocks
    for i, (o, lse) in enumerate(outs):
        for j in range(i + 1):
            gq, gk, gv = block_backward(do[:, :, i * c:(i + 1) * c], qs[i], ks[j], vs[j], o, lse, j == i, scale,
                                        kernel)
            dq[:, :, i * c:(i + 1) * c] += gq
            dk[:, :, j * c:(j + 1) * c] += gk
            dv_[:, :, j * c:(j + 1) * c] += gv
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    for got, leaf in zip((dq, dk, dv_), leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, rtol=tol, atol=tol)


def test_bf16_on_cpu_runs_in_fp32():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8).bfloat16() for _ in range(3))
    o, lse = block_forward(q, k, v, True, 0.5)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.5)
    torch.testing.assert_close(o, ref, rtol=1e-6, atol=1e-6)
    grads = block_backward(torch.ones(1, 2, 16, 8), q, k, v, o, lse, True, 0.5)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_blocks_on_cuda_merge_to_whole_attention(dtype, tol):
    """The CUDA path (the memory-efficient kernel with its log-sum-exp, whose rows it pads to 32) at MLA's head
    dims (q/k 192, v 128) against one causal attention over the whole sequence, in outputs and gradients."""
    torch.manual_seed(0)
    B, H, T, scale, n_blocks = 1, 4, 512, 192**-0.5, 4
    q, k, v = (torch.randn(B, H, T, d, device="cuda", dtype=dtype) for d in (192, 192, 128))
    do = torch.randn(B, H, T, 128, device="cuda", dtype=dtype)
    leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
    ref.backward(do.float())
    qs, ks, vs, outs = _blockwise(q, k, v, n_blocks, scale, "fused")
    torch.testing.assert_close(torch.cat([o for o, _ in outs], dim=2).float(), ref.detach(), rtol=tol, atol=tol)
    grads = [torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v)]
    c = T // n_blocks
    for i, (o, lse) in enumerate(outs):
        for j in range(i + 1):
            parts = block_backward(do[:, :, i * c:(i + 1) * c], qs[i], ks[j], vs[j], o, lse, j == i, scale)
            for g, part, at in zip(grads, parts, (i, j, j), strict=True):
                g[:, :, at * c:(at + 1) * c] += part.float()
    for got, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, rtol=tol, atol=tol)
