"""Triton grouped blockwise-FP8 GEMM on SM90: ``grouped.fp8_group_gemm``'s GPU path.

``out[rows of g] = a[rows of g] @ b[g].T`` with ``fp8_gemm_reference``'s semantics per group: for each 128-wide
slice of K one FP8 tensor-core dot into a fresh FP32 accumulator (at most 128 products accumulated in the
tensor core's limited precision), scaled by the slice's 1x128 scales of ``a``'s rows and the 128x128 block
scale of ``b``, and added to the FP32 accumulator in registers: DeepSeek-V3's promotion every N_C = 128
elements, as in ``inference/kernel.py``'s ``fp8_gemm`` (REFERENCE.md §3). This module imports Triton at
import time and is only imported when a CUDA tensor is multiplied.

Tile schedule, on the device: the tiles of group ``g`` are its ``⌈count_g / BM⌉`` row tiles, numbered after
those of the groups before it (``tile_ends``, a cumulative sum of ``offs``'s differences, computed by torch
on the device). The grid is a fixed bound known from shapes alone, ``⌈M / BM⌉ + G`` row tiles (each group
wastes at most one partial tile) times ``⌈N / BN⌉`` column tiles; a program finds its group by counting
the ``tile_ends`` at or below its row tile, and a program past the last tile returns at once. Nothing is
read back on the host, and a new token count does not recompile (M is not a kernel argument).

Every load is masked (rows past the group's end, columns past N, K past its end read zero), so no width
needs to be a multiple of 128, and every operand comes with its strides: a transposed view of the weight
stack serves Dgrad without a copy.

Defaults for H100/H200, fixed (no autotuning; nothing measured on a CPU decides them): BK = 128 so each K
step is one scale block (one promotion); BN = 128 so one weight-block scale serves the whole tile (a scalar
load per K step); BM = 128, the row alignment of DeepGEMM's contiguous grouped layout, small enough that
the partial last tile of each expert wastes little at training row counts (V2-Lite: 8192 x 6 / 64 = 768
rows per expert on average). num_warps = 8: two warpgroups of 64 x 128 wgmma tiles. num_stages = 4: a
128 x 128 FP8 tile of ``a`` and of ``b`` is 16 KiB each, so four stages hold 128 KiB of the 228 KiB of
shared memory per SM and keep three K steps of loads in flight to hide HBM latency.
"""

import torch
import triton
import triton.language as tl

from haillm.fp8.quant import ceil_div

BLOCK = 128
BM, BN, BK = 128, BLOCK, BLOCK
NUM_WARPS, NUM_STAGES = 8, 4


@triton.jit(do_not_specialize=["N", "K", "G"])
def _group_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, offs_ptr, tile_ends_ptr,
    N, K, G,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bg, stride_bn, stride_bk, stride_bsg, stride_bsn, stride_bsk,
    stride_om, stride_on,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G_POW2: tl.constexpr,
):
    """One ``[BM, BN]`` tile of ``out``: rows of one group, ``BN`` columns (one 128-row block of ``b[g]``)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    groups = tl.arange(0, G_POW2)
    tile_ends = tl.load(tile_ends_ptr + groups, mask=groups < G, other=2147483647)
    g = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)  # empty groups end where they start: skipped
    if g >= G:
        return
    first_tile = tl.load(tile_ends_ptr + g - 1, mask=g > 0, other=0)
    row_start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    row_end = tl.load(offs_ptr + g)
    rows = row_start + (pid_m - first_tile) * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok, col_ok = rows < row_end, cols < N
    rows64, cols64, g64 = rows.to(tl.int64), cols.to(tl.int64), g.to(tl.int64)

    a_ptrs = a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + g64 * stride_bg + cols64[None, :] * stride_bn + ks[:, None] * stride_bk  # [BK, BN]: b[g].T
    as_ptrs = as_ptr + rows64 * stride_asm
    bs_ptr_tile = bs_ptr + g64 * stride_bsg + pid_n * stride_bsn  # BN == 128: one weight block per K step
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        k_ok = kb * BK + ks < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        sa = tl.load(as_ptrs + kb * stride_ask, mask=row_ok, other=0.0)
        sb = tl.load(bs_ptr_tile + kb * stride_bsk)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb  # promotion every 128 elements of K
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    out_ptrs = out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def group_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, offs: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``grouped.fp8_group_gemm`` of CUDA operands (arguments already checked), without a host sync."""
    (m, k), (g, n, _) = a.shape, b.shape
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    tile_ends = torch.cumsum(torch.div(counts + (BM - 1), BM, rounding_mode="floor"), 0, dtype=torch.int32)
    grid = (ceil_div(m, BM) + g, ceil_div(n, BN))
    _group_gemm_kernel[grid](
        a, a_s, b, b_s, out, offs, tile_ends, n, k, g,
        *a.stride(), *a_s.stride(), *b.stride(), *b_s.stride(), *out.stride(),
        BM=BM, BN=BN, BK=BK, G_POW2=max(16, triton.next_power_of_2(g)), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
