"""Grouped blockwise-FP8 GEMM: ``out[rows of g] = a[rows of g] @ b[g].T`` for every group (expert) in one call.

Semantics: ``gemm.fp8_gemm`` with 128x128 weight blocks, group by group (FP32 promotion per 128-wide K
slice). ``a [M, K]`` holds every group's rows, sorted by group, scaled per 1x128 tile (``a_s [M, ⌈K/128⌉]``).
A tile lies within one row, so one ``act_quant`` of the whole sorted matrix is the quantization of each
group on its own. ``b [G, N, K]`` is a stack of weights scaled per 128x128 block (``b_s [G, ⌈N/128⌉,
⌈K/128⌉]``, ``weight_quant`` of the stack: no block straddles two weights). ``offs`` holds the int32
cumulative end row of each group on ``a``'s device (``offs[-1] == M``); empty groups are allowed. ``b`` and
the scales may be any strided views: Dgrad passes ``W.T``, the transposed stack that ``weight_quant_with_t``
writes K-major (square blocks transpose exactly); on SM90 a K-major ``b`` is what lets the kernel copy its
tiles ahead asynchronously.

The grouped weight gradient ``fp8_group_wgrad`` (DeepGEMM's "k-grouped" GEMM: the groups split the
contraction, here the tokens) is ``linear.fp8_wgrad`` of every group: ``dW[g] = dy[rows of g].T @ x[rows of
g]`` with both operands tiled 1x128 along the group's own tokens, starting at its first row. A token tile
must not straddle two groups, so the rows are first scattered into a zero-padded buffer where every group
starts at a multiple of 128 (``aligned_token_layout``, device-side torch ops, the same code on CPU and GPU);
one ``act_quant_t`` / ``requant_t`` of the buffer is then each group's own 128x1 quantization (zeros never
raise an amax), and the GEMM sums, per group, one promoted 128-token slice after another.

Where it runs (``group_gemm_plan``): the CPU runs ``fp8_group_gemm_reference`` / ``fp8_k_grouped_gemm_reference``,
``fp8_gemm_reference`` per group over host-side offsets; an SM90 GPU runs the Triton kernels of
``triton_grouped``, which read the group bounds on the device and never synchronise with the host; any other
GPU raises (the FP8 policy keeps such GPUs on BF16). The references never run on a GPU.
"""

from typing import NamedTuple

import torch

from haillm.fp8.gemm import BLOCK, blockwise_fp8_available, device_capability, fp8_gemm_reference
from haillm.fp8.quant import FP8_DTYPE, GRAD_AMAX_MIN, act_quant_t, ceil_div, requant_t


def group_gemm_plan(capability: tuple[int, int] | None) -> str:
    """How ``fp8_group_gemm`` runs on a device of ``capability`` (None: CPU): "reference" (CPU only),
    "triton" (SM90) or "unsupported"."""
    if capability is None:
        return "reference"
    return "triton" if blockwise_fp8_available(capability) else "unsupported"


def _check_args(a, a_s, b, b_s, offs) -> None:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"fp8_group_gemm expects {FP8_DTYPE} operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise ValueError(f"fp8_group_gemm computes a[M,K] @ b[g][N,K].T, got {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), (g, n, _) = a.shape, b.shape
    kb = ceil_div(k, BLOCK)
    if tuple(a_s.shape) != (m, kb) or tuple(b_s.shape) != (g, ceil_div(n, BLOCK), kb):
        raise ValueError(f"scale shapes {tuple(a_s.shape)}, {tuple(b_s.shape)} do not match a 1x128 a-scale "
                         f"{(m, kb)} and a 128x128 b-scale {(g, ceil_div(n, BLOCK), kb)}")
    if offs.dtype != torch.int32 or tuple(offs.shape) != (g,):
        raise ValueError(f"offs must be int32 [{g}] (one end row per group), got {offs.dtype} {tuple(offs.shape)}")


def fp8_group_gemm_reference(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """fp32 ``[M, N]``: ``fp8_gemm_reference`` of every non-empty group, over offsets read on the host. Each
    weight is made contiguous first, so a transposed view gives the bits ``fp8_gemm`` of ``w_q.t().contiguous()``
    gives."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = fp8_gemm_reference(a[start:end], a_s[start:end], b[g].contiguous(), b_s[g].contiguous())
        start = end
    return out


def _plan(device: torch.device) -> str:
    """``group_gemm_plan`` of ``device``; raises where no grouped FP8 GEMM runs."""
    plan = group_gemm_plan(device_capability(device))
    if plan == "unsupported":
        raise RuntimeError(f"grouped FP8 GEMMs need an SM90 (Hopper) GPU, not {torch.cuda.get_device_name(device)}"
                           "; run with fp8.enabled=false")
    return plan


def fp8_group_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``a[rows of g] @ b[g].T`` for every group ``g`` (see the module doc), returned in ``out_dtype``."""
    _check_args(a, a_s, b, b_s, offs)
    if _plan(a.device) == "reference":
        return fp8_group_gemm_reference(a, a_s, b, b_s, offs).to(out_dtype)
    from haillm.fp8 import triton_grouped

    return triton_grouped.group_gemm(a, a_s, b, b_s, offs, out_dtype)


# ---- k-grouped Wgrad ---------------------------------------------------------------------------------------


class TokenLayout(NamedTuple):
    """Where ``aligned_token_layout`` puts the rows: ``rows`` int64 ``[M]``, the padded row of each row;
    ``starts``/``ends`` int32 ``[G]``, each group's padded rows (``starts`` a multiple of 128, ``ends - starts``
    its count rounded up to 128); ``size``, the padded buffer's rows, a multiple of 128 known from shapes."""

    rows: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    size: int


def aligned_token_layout(offs: torch.Tensor, m: int) -> TokenLayout:
    """The 128-aligned token layout of ``m`` rows sorted into groups ending at ``offs`` (int32, on the rows'
    device), from device-side ops only: nothing is read back, no output is sized by data, so a GPU never waits.

    Group ``g`` keeps its rows in order from padded row ``starts[g]``, the exclusive cumulative sum of the
    counts rounded up to 128; the gap up to the next group's start is padding. Each non-empty group pads fewer
    than 128 rows and at most ``min(G, m)`` groups are non-empty, so the padded total, a multiple of 128, is at
    most ``⌊(m + 127 * min(G, m)) / 128⌋ * 128``: the static ``size``."""
    g = offs.shape[0]
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    padded = torch.div(counts + (BLOCK - 1), BLOCK, rounding_mode="floor") * BLOCK
    ends = torch.cumsum(padded, 0, dtype=torch.int32)
    starts = ends - padded
    row = torch.arange(m, dtype=offs.dtype, device=offs.device)
    group = torch.searchsorted(offs, row, right=True)  # rows before offs[g] and at or after offs[g - 1]
    rows = (starts - (offs - counts)).long()[group] + row  # padded start + position within the group
    return TokenLayout(rows, starts, ends, (m + (BLOCK - 1) * min(g, m)) // BLOCK * BLOCK)


def _scatter_rows(t: torch.Tensor, layout: TokenLayout, fill: float) -> torch.Tensor:
    """``t [M, C]`` at ``layout.rows`` of a ``[size, C]`` buffer of ``fill``; FP8 through its bytes (0x00 is +0)."""
    if t.dtype == FP8_DTYPE:
        return _scatter_rows(t.view(torch.uint8), layout, fill).view(FP8_DTYPE)
    return t.new_full((layout.size, t.shape[1]), fill).index_copy_(0, layout.rows, t)


def wgrad_operands(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, offs: torch.Tensor, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout]:
    """The k-grouped Wgrad's FP8 operands in the aligned token layout: ``act_quant_t`` of ``dy`` (``[N, size]``,
    gradient floor) and ``requant_t`` of the FP8 ``x`` (``[K, size]``), each with its ``[·, size / 128]``
    scales, and the layout. Padding rows are zero (``x``'s with scale 1), so every 128-token tile holds one
    group's rows only and quantizes to exactly that group's own tile."""
    layout = aligned_token_layout(offs, dy.shape[0])
    a, a_s = act_quant_t(_scatter_rows(dy, layout, 0.0), pow2=pow2, min_amax=GRAD_AMAX_MIN)
    b, b_s = requant_t(_scatter_rows(x_q, layout, 0.0), _scatter_rows(x_s, layout, 1.0), pow2=pow2)
    return a, a_s, b, b_s, layout


def fp8_k_grouped_gemm_reference(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """fp32 ``[G, N, K]``: ``fp8_gemm_reference(..., b_block=1)`` of every non-empty group's token columns
    ``starts[g]:ends[g]`` (read on the host) of ``a [N, T]`` and ``b [K, T]``; zero for empty groups."""
    out = torch.zeros(starts.shape[0], a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for g, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if e > s:
            tiles = slice(s // BLOCK, e // BLOCK)
            out[g] = fp8_gemm_reference(a[:, s:e], a_s[:, tiles], b[:, s:e], b_s[:, tiles], b_block=1)
    return out


def fp8_k_grouped_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, layout: TokenLayout,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dW[g] = a[:, tokens of g] @ b[:, tokens of g].T`` from ``wgrad_operands``, ``[G, N, K]`` in ``out_dtype``."""
    if _plan(a.device) == "reference":
        return fp8_k_grouped_gemm_reference(a, a_s, b, b_s, layout.starts, layout.ends).to(out_dtype)
    from haillm.fp8 import triton_grouped

    return triton_grouped.k_grouped_gemm(a, a_s, b, b_s, layout.starts, layout.ends, out_dtype)


def fp8_group_wgrad(
    dy: torch.Tensor,
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    offs: torch.Tensor,
    pow2: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``fp8_wgrad(dy[rows of g], x_q[rows of g], x_s[rows of g])`` of every group ``g`` as ``[G, N, K]`` in
    ``out_dtype`` (zero for empty groups), from ``dy [M, N]`` and ``act_quant(x)`` of ``x [M, K]``, with no
    host synchronisation on a GPU (see the module doc)."""
    (m, n), k = dy.shape, x_q.shape[1]
    if x_q.dtype != FP8_DTYPE or x_q.shape[0] != m or tuple(x_s.shape) != (m, ceil_div(k, BLOCK)):
        raise ValueError(f"fp8_group_wgrad expects dy [M, N] and act_quant(x [M, K]), got {tuple(dy.shape)}, "
                         f"{x_q.dtype} {tuple(x_q.shape)} and scales {tuple(x_s.shape)}")
    if offs.dtype != torch.int32 or offs.dim() != 1:
        raise ValueError(f"offs must be int32 [G] (one end row per group), got {offs.dtype} {tuple(offs.shape)}")
    if m == 0 or n == 0 or k == 0:  # no contraction: nothing to launch
        return dy.new_zeros(offs.shape[0], n, k, dtype=out_dtype)
    return fp8_k_grouped_gemm(*wgrad_operands(dy, x_q, x_s, offs, pow2), out_dtype)
