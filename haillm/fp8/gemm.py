"""Blockwise-scaled FP8 GEMM ``a @ b.T`` with FP32 promotion every 128 elements of K.

Semantics (DeepSeek-V3 report §3.3.2, DeepGEMM, ``inference/kernel.py``): for each 128-wide slice of K the
FP8 blocks are multiplied, the partial product is scaled by that slice's per-row scale of ``a`` and the
scale of ``b``'s rows, and added to an FP32 accumulator.

- ``a [M, K]`` is always scaled 1x128 (``a_s [M, ceil(K/128)]``, from ``act_quant``).
- ``b [N, K]`` is scaled per 128x128 block (``b_block=128``, ``b_s [ceil(N/128), ceil(K/128)]``, from
  ``weight_quant``: Fprop and Dgrad) or 1x128 like ``a`` (``b_block=1``, ``b_s [N, ceil(K/128)]``: the Wgrad
  recipe of DeepGEMM's ``wgrad_gemm_fp8_fp8_fp32_nt``, where K is the token dimension).

On a Hopper GPU every shape goes through ``torch.nn.functional.scaled_mm`` (cuBLAS blockwise scaling):
shapes cuBLAS does not take as they are (M not a multiple of 4, K not a multiple of 128, N not whole
blocks, as per-expert token counts and 576-wide projections are) are zero-padded to the next size it takes
and the result sliced (``pad_for_scaled_mm``; zeros add nothing to any dot product, so the values are
those of the unpadded product). The CPU runs ``fp8_gemm_reference``: FP8 upcast to FP32, one batched matmul
over the K slices, then the scaled sum; it is device-agnostic and exact about the semantics, and never
runs on a GPU (``gemm_plan`` is the rule; a GPU without blockwise FP8 raises, and the FP8 policy keeps
such GPUs on BF16).
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
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device`` (None for the CPU)."""
    return _cuda_capability(device.index or 0) if device.type == "cuda" else None


def blockwise_fp8_available(capability: tuple[int, int] | None) -> bool:
    """Whether ``fp8_gemm`` can run on a device of this capability: the CPU (None: the reference) or SM90
    (torch's "DeepSeek style" blockwise scaling needs cuBLASLt >= 12.9 on Hopper)."""
    return capability is None or capability[0] == 9


def scaled_mm_shape(m: int, k: int, n: int, b_block: int) -> tuple[int, int, int]:
    """The smallest (M, K, N) at least (m, k, n) that cuBLAS's blockwise ``scaled_mm`` takes: K a multiple
    of 128, b's rows whole 128-blocks (16 for 1x128 tiles) and M a multiple of 4, so that the column-major
    scale strides are 16-byte aligned."""
    n_unit = BLOCK if b_block == BLOCK else 16
    return -(-m // 4) * 4, -(-k // BLOCK) * BLOCK, -(-n // n_unit) * n_unit


def gemm_plan(capability: tuple[int, int] | None, m: int, k: int, n: int, b_block: int = BLOCK) -> str:
    """How ``fp8_gemm`` runs ``[m, k] x [n, k]^T`` on a device of ``capability`` (None: CPU): "reference"
    (CPU only), "scaled_mm", "scaled_mm_padded", or "unsupported" (a GPU without blockwise FP8)."""
    if capability is None:
        return "reference"
    if not blockwise_fp8_available(capability):
        return "unsupported"
    return "scaled_mm" if scaled_mm_shape(m, k, n, b_block) == (m, k, n) else "scaled_mm_padded"


def scaled_mm_supported(a: torch.Tensor, b: torch.Tensor, b_block: int, out_dtype: torch.dtype) -> bool:
    """Whether ``F.scaled_mm`` takes this case as it is (no padding), on this device."""
    (m, k), n = a.shape, b.shape[0]
    return (a.is_cuda and b.is_cuda and gemm_plan(device_capability(a.device), m, k, n, b_block) == "scaled_mm"
            and out_dtype in (torch.bfloat16, torch.float16, torch.float32))


def _pad_rows_cols(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """``t`` [r, c] zero- (or ``value``-) padded to [rows, cols]; FP8 through its bytes (E4M3's zero is 0x00)."""
    if tuple(t.shape) == (rows, cols):
        return t
    if t.dtype == FP8_DTYPE:
        return F.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0])).view(FP8_DTYPE)
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


def pad_for_scaled_mm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, b_block: int = BLOCK,
    b_padded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operands padded to ``scaled_mm_shape``: zero data (padded K sits in the last scale block, whose
    scale is unchanged), scale 1 for new rows. ``fp8_gemm_reference`` of the result, sliced to [m, n], is
    that of the unpadded operands (to fp32 rounding: every product added is the same or zero).
    ``b_padded``: ``pad_operand(b, b_s)`` made beforehand (a weight's, kept by ``Fp8WeightCache``), used as
    it is instead of padding ``b`` again."""
    (m, k), n = a.shape, b.shape[0]
    m2, k2, n2 = scaled_mm_shape(m, k, n, b_block)
    a = _pad_rows_cols(a, m2, k2)
    a_s = _pad_rows_cols(a_s, m2, a_s.shape[1], 1.0)
    if b_padded is not None:
        b, b_s = b_padded
        want = ((n2, k2), (ceil_div(n2, b_block), ceil_div(k, BLOCK)))
        if (tuple(b.shape), tuple(b_s.shape)) != want:
            raise ValueError(f"b_padded has shapes {tuple(b.shape)}, {tuple(b_s.shape)}; padding b "
                             f"{(n, k)} gives {want}")
        return a, a_s, b, b_s
    return a, a_s, *pad_operand(b, b_s, b_block)


def pad_operand(b: torch.Tensor, b_s: torch.Tensor, b_block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``b [N, K]`` and its scales as ``pad_for_scaled_mm`` pads them (b's padding depends on N and K only)."""
    (n, k) = b.shape
    _, k2, n2 = scaled_mm_shape(4, k, n, b_block)
    return _pad_rows_cols(b, n2, k2), _pad_rows_cols(b_s, ceil_div(n2, b_block), b_s.shape[1], 1.0)


def padded_weight(b: torch.Tensor, b_s: torch.Tensor, b_block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``pad_operand(b, b_s)`` where ``fp8_gemm`` on ``b``'s device pads ``b`` (cuBLAS, N or K not whole
    blocks: V3's 576 and 2112, V2-Lite's 10944), else None (the CPU's reference; whole blocks): the copy a
    weight cache keeps, so that the GEMMs of every micro-batch do not pad the weight again."""
    n, k = b.shape
    if gemm_plan(device_capability(b.device), 4, k, n, b_block) != "scaled_mm_padded":
        return None
    return pad_operand(b, b_s, b_block)


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
    b_padded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``a @ b.T`` from FP8 operands and their scales (see the module doc), returned in ``out_dtype``.
    ``b_padded`` is ``pad_operand(b, b_s, b_block)`` made beforehand (``Fp8WeightCache.padded``): where the
    GEMM is padded it is read instead of ``b`` (which then serves for its shape only), else ignored."""
    _check_args(a, a_s, b, b_s, b_block)
    (m, k), n = a.shape, b.shape[0]
    plan = gemm_plan(device_capability(a.device), m, k, n, b_block)
    if plan == "reference":
        return fp8_gemm_reference(a, a_s, b, b_s, b_block).to(out_dtype)
    if plan == "unsupported":
        raise RuntimeError(f"blockwise FP8 GEMMs need an SM90 (Hopper) GPU, not {torch.cuda.get_device_name(a.device)}"
                           "; run with fp8.enabled=false")
    if plan == "scaled_mm_padded":
        out = fp8_gemm_scaled_mm(*pad_for_scaled_mm(a, a_s, b, b_s, b_block, b_padded), out_dtype, b_block=b_block)
        return out[:m, :n]
    return fp8_gemm_scaled_mm(a, a_s, b, b_s, out_dtype, b_block=b_block)
