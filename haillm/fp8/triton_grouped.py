"""Triton grouped blockwise-FP8 GEMMs on SM90: ``grouped.fp8_group_gemm``'s and ``grouped.fp8_group_wgrad``'s
GPU paths.

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

Integer arguments are specialized as Triton does by default (a multiple of 16, equal to 1, or neither): a
handful of variants per layer, and what lets the compiler prove 16-byte alignment. Without it (Triton's
``do_not_specialize``) the loads of a row could not be vectorized, so the K loops would not be
software-pipelined and ptxas would spill registers; ``tests/test_triton_sm90.py`` compiles every kernel for
SM90 on a machine without a GPU and checks pipelining, spills and shared memory.

Every load is masked (rows past the group's end, columns past N, K past its end read zero), so no width
needs to be a multiple of 128, and every operand comes with its strides: Dgrad's ``W.T`` is the transposed
stack ``quant.weight_quant_with_t`` writes, views of one K-major array (a view of ``W`` itself would be read
too, but N-major tiles cannot be copied ahead for FP8 wgmma).

Defaults for H100/H200, fixed (no autotuning; nothing measured on a CPU decides them): BK = 128 so each K
step is one scale block (one promotion); BN = 128 so one weight-block scale serves the whole tile (a scalar
load per K step); BM = 128, the row alignment of DeepGEMM's contiguous grouped layout, small enough that
the partial last tile of each expert wastes little at training row counts (V2-Lite: 8192 x 6 / 64 = 768
rows per expert on average). num_warps = 8: two warpgroups of 64 x 128 wgmma tiles. num_stages = 4: a
128 x 128 FP8 tile of ``a`` and of ``b`` is 16 KiB each, so four stages hold 128 KiB of the 228 KiB of
shared memory per SM and keep three K steps of loads in flight to hide HBM latency.

The k-grouped Wgrad GEMM (``k_grouped_gemm``): ``dW[g] = a[:, tokens of g] @ b[:, tokens of g].T`` with
``a [N, T]`` and ``b [K, T]`` quantized along the tokens in the 128-aligned layout of
``grouped.aligned_token_layout``, so group ``g`` owns the whole 128-token tiles ``starts[g]:ends[g]`` (device
tensors) and each step is one token tile of both operands: one FP8 dot into a fresh FP32 accumulator, scaled
by the tile's 1x128 scales of ``a``'s and ``b``'s rows and added up in FP32, as
``fp8_gemm_reference(..., b_block=1)`` per group (DeepGEMM's ``k_grouped_wgrad_gemm_fp8_fp8_fp32_nt``). The
grid is ``(⌈K / WGRAD_BK⌉, ⌈N / BN⌉, G)``, fixed by shapes: the programs of one group run next to each other, so
its token slices of ``a`` and ``b`` are read from HBM about once and then from L2; a program reads its
group's tile range on the device and loops over it, so an empty group's programs write zeros. Token tiles
are whole by construction (``ends[g] <= T``), so only N and K are masked, and the tile bounds are declared
multiples of 128 (``tl.multiple_of``: they come from memory, so the compiler cannot see it), which makes the
token-contiguous loads asynchronous copies. BT = 128 tokens: one scale tile, one promotion per step. The
output tile is BN x WGRAD_BK = 128 x 64: every element is scaled by its row's and its column's scale per step,
and at 128 x 128 those vectors pushed ptxas past 255 registers into spills (40 bytes at 4 stages, still 8 at
2); at 128 x 64 it needs 160 registers, no spills, and 96 KiB of shared memory for 4 stages, so two programs
fit on an SM. num_warps = 8 as above.
"""

import torch
import triton
import triton.language as tl

from haillm.fp8.quant import ceil_div

BLOCK = 128
BM, BN, BK, BT = 128, BLOCK, BLOCK, BLOCK
NUM_WARPS, NUM_STAGES = 8, 4
WGRAD_BK, WGRAD_STAGES = 64, 4


@triton.jit
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


@triton.jit
def _k_grouped_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, starts_ptr, ends_ptr,
    N, K,
    stride_an, stride_at, stride_asn, stride_ast,
    stride_bk, stride_bt, stride_bsk, stride_bst,
    stride_og, stride_on, stride_ok,
    BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
):
    """One ``[BN, BK]`` tile of ``dW[g]``, summed over group ``g``'s 128-token tiles."""
    pid_k, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = tl.multiple_of(tl.load(starts_ptr + g), BT), tl.multiple_of(tl.load(ends_ptr + g), BT)
    ns = pid_n * BN + tl.arange(0, BN)
    ks = pid_k * BK + tl.arange(0, BK)
    tokens = (start + tl.arange(0, BT)).to(tl.int64)
    n_ok, k_ok = ns < N, ks < K
    ns64, ks64 = ns.to(tl.int64), ks.to(tl.int64)

    a_ptrs = a_ptr + ns64[:, None] * stride_an + tokens[None, :] * stride_at  # [BN, BT]
    b_ptrs = b_ptr + ks64[None, :] * stride_bk + tokens[:, None] * stride_bt  # [BT, BK]: b.T
    tile = (start // BT).to(tl.int64)
    as_ptrs = as_ptr + ns64 * stride_asn + tile * stride_ast
    bs_ptrs = bs_ptr + ks64 * stride_bsk + tile * stride_bst
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for _ in range(0, (end - start) // BT):  # no iteration for an empty group: its tile stays zero
        a = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
        sa = tl.load(as_ptrs, mask=n_ok, other=0.0)
        sb = tl.load(bs_ptrs, mask=k_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]  # promotion every 128 tokens
        a_ptrs += BT * stride_at
        b_ptrs += BT * stride_bt
        as_ptrs += stride_ast
        bs_ptrs += stride_bst
    out_ptrs = out_ptr + g.to(tl.int64) * stride_og + ns64[:, None] * stride_on + ks64[None, :] * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def k_grouped_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``grouped.fp8_k_grouped_gemm`` of CUDA operands in the aligned token layout, without a host sync."""
    (n, _), k, g = a.shape, b.shape[0], starts.shape[0]
    out = torch.empty(g, n, k, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    grid = (ceil_div(k, WGRAD_BK), ceil_div(n, BN), g)
    _k_grouped_kernel[grid](
        a, a_s, b, b_s, out, starts, ends, n, k,
        *a.stride(), *a_s.stride(), *b.stride(), *b_s.stride(), *out.stride(),
        BN=BN, BK=WGRAD_BK, BT=BT, num_warps=NUM_WARPS, num_stages=WGRAD_STAGES,
    )
    return out
