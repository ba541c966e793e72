"""Blockwise-scaled FP8 GEMM ``a @ b.T`` with FP32 promotion every 128 elements of K.

Semantics (DeepSeek-V3 report §3.3.2, DeepGEMM, ``inference/kernel.py``): for each 128-wide slice of K the
FP8 blocks are multiplied, the partial product is scaled by that slice's per-row scale of ``a`` and the
scale of ``b``'s rows, and added to an FP32 accumulator.

- ``a [M, K]`` is always scaled 1x128 (``a_s [M, ceil(K/128)]``, from ``act_quant``).
- ``b [N, K]`` is scaled per 128x128 block (``b_block=128``, ``b_s [ceil(N/128), ceil(K/128)]``, from
  ``weight_quant``: Fprop and Dgrad) or 1x128 like ``a`` (``b_block=1``, ``b_s [N, ceil(K/128)]``: the Wgrad
  recipe of DeepGEMM's ``wgrad_gemm_fp8_fp8_fp32_nt``, where K is the token dimension).

On a Hopper GPU supported shapes go through ``torch.nn.functional.scaled_mm`` (cuBLAS blockwise scaling);
everything else, the CPU included, runs ``fp8_gemm_reference``: FP8 upcast to FP32, one batched matmul over
the K slices, then the scaled sum. The reference is device-agnostic and exact about the semantics.
"""

import functools

import torch
import torch.nn.functional as F

from haillm.fp8.quant import FP8_DTYPE, ceil_div

BLOCK = 128
# Bound on the [K-slices, M, N] fp32 temporary of the reference; larger problems are split along K.
_REF_CHUNK_BYTES = 256 * 2**20


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's accuracy metric ``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64 (0 when equal)."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def _check_args(a, a_s, b, b_s, b_block) -> None:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"fp8_gemm expects {FP8_DTYPE} operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm computes a[M,K] @ b[N,K].T, got {tuple(a.shape)} and {tuple(b.shape)}")
    if b_block not in (1, BLOCK):
        raise ValueError(f"b_block must be 1 (1x128 tiles) or 128 (128x128 blocks), got {b_block}")
    (m, k), n = a.shape, b.shape[0]
    kb = ceil_div(k, BLOCK)
    want_b_s = (ceil_div(n, b_block), kb)
    if tuple(a_s.shape) != (m, kb) or tuple(b_s.shape) != want_b_s:
        raise ValueError(
            f"scale shapes {tuple(a_s.shape)}, {tuple(b_s.shape)} do not match a 1x128 a-scale {(m, kb)} "
            f"and a {'128x128' if b_block == BLOCK else '1x128'} b-scale {want_b_s}"
        )


def fp8_gemm_reference(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, b_block: int = BLOCK
) -> torch.Tensor:
    """Plain-torch ``a @ b.T`` with per-128-K promotion; returns fp32 ``[M, N]``. Its batched matmul is fp32
    by definition, so autocast is kept out of it."""
    with torch.autocast(a.device.type, enabled=False):
        return _reference(a, a_s, b, b_s, b_block)


def _reference(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, b_block: int) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[0]
    kb = ceil_div(k, BLOCK)
    pad = kb * BLOCK - k
    a_blk = F.pad(a.float(), (0, pad)).reshape(m, kb, BLOCK).transpose(0, 1)  # [kb, M, 128]
    b_blk = F.pad(b.float(), (0, pad)).reshape(n, kb, BLOCK).permute(1, 2, 0)  # [kb, 128, N]
    b_rows = b_s.t().float().repeat_interleave(b_block, dim=1)[:, :n]  # [kb, N]: scale of every row of b
    a_cols = a_s.t().float()  # [kb, M]
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    step = max(1, _REF_CHUNK_BYTES // max(1, 4 * m * n))
    for k0 in range(0, kb, step):
        sl = slice(k0, k0 + step)
        partial = torch.bmm(a_blk[sl], b_blk[sl])  # [chunk, M, N], each one 128-wide K slice
        out += (partial * a_cols[sl, :, None] * b_rows[sl, None, :]).sum(dim=0)
    return out


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def scaled_mm_supported(a: torch.Tensor, b: torch.Tensor, b_block: int, out_dtype: torch.dtype) -> bool:
    """Whether ``F.scaled_mm`` takes this case: SM90 only (torch's "DeepSeek style" blockwise scaling needs
    cuBLASLt >= 12.9 on Hopper), K a multiple of 128, b's rows whole 128-blocks (16 for 1x128 tiles) and
    M (and N for 1x128 tiles) a multiple of 4 so the column-major scale strides are 16-byte aligned."""
    if not (a.is_cuda and b.is_cuda) or not _is_sm90(a.device.index or 0):
        return False
    (m, k), n = a.shape, b.shape[0]
    n_ok = n % BLOCK == 0 if b_block == BLOCK else (n % 16 == 0)
    return (
        out_dtype in (torch.bfloat16, torch.float16, torch.float32) and k % BLOCK == 0 and m % 4 == 0 and n_ok
    )


def fp8_gemm_scaled_mm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    b_block: int = BLOCK,
) -> torch.Tensor:
    """``fp8_gemm`` forced onto cuBLAS, without the support check.

    Layouts torch 2.13's ``_scaled_mm_v2`` requires (ScaledBlas.cpp, ``_check_sizes_v2`` in
    ``_meta_registrations.py``): ``a`` row-major and ``mat_b = b.T`` column-major; a 1x128 scale is
    ``[rows, K/128]`` with strides ``(1, rows)``; the 128x128 scale of ``mat_b`` is
    ``[round_up(K/128, 4), N/128]`` with strides ``(1, round_up(K/128, 4))`` (K-blocks padded to 4)."""
    kb = a_s.shape[1]
    scale_a = a_s.float().t().contiguous().t()
    if b_block == BLOCK:
        l4 = ceil_div(kb, 4) * 4
        scale_b = F.pad(b_s.float(), (0, l4 - kb)).contiguous().t()
        recipe_b = F.ScalingType.BlockWise128x128
    else:
        scale_b = b_s.float().t().contiguous().t()
        recipe_b = F.ScalingType.BlockWise1x128
    return F.scaled_mm(
        a.contiguous(),
        b.contiguous().t(),
        scale_a,
        F.ScalingType.BlockWise1x128,
        scale_b,
        recipe_b,
        output_dtype=out_dtype,
    )


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    b_block: int = BLOCK,
) -> torch.Tensor:
    """``a @ b.T`` from FP8 operands and their scales (see the module doc), returned in ``out_dtype``."""
    _check_args(a, a_s, b, b_s, b_block)
    if scaled_mm_supported(a, b, b_block, out_dtype):
        return fp8_gemm_scaled_mm(a, a_s, b, b_s, out_dtype, b_block=b_block)
    return fp8_gemm_reference(a, a_s, b, b_s, b_block).to(out_dtype)
