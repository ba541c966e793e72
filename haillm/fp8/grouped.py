"""Grouped blockwise-FP8 GEMM: ``out[rows of g] = a[rows of g] @ b[g].T`` for every group (expert) in one call.

Semantics: ``gemm.fp8_gemm`` with 128x128 weight blocks, group by group (FP32 promotion per 128-wide K
slice). ``a [M, K]`` holds every group's rows, sorted by group, scaled per 1x128 tile (``a_s [M, ⌈K/128⌉]``).
A tile lies within one row, so one ``act_quant`` of the whole sorted matrix is the quantization of each
group on its own. ``b [G, N, K]`` is a stack of weights scaled per 128x128 block (``b_s [G, ⌈N/128⌉,
⌈K/128⌉]``, ``weight_quant`` of the stack: no block straddles two weights). ``offs`` holds the int32
cumulative end row of each group on ``a``'s device (``offs[-1] == M``); empty groups are allowed. ``b`` and
the scales may be any strided views: Dgrad passes ``W.T`` as the transposed view of the quantized stack
(square blocks transpose exactly), read in place.

Where it runs (``group_gemm_plan``): the CPU runs ``fp8_group_gemm_reference``, ``fp8_gemm_reference`` per
group over host-side offsets; an SM90 GPU runs the Triton kernel of ``triton_grouped``, which schedules its
tiles on the device and never synchronises with the host; any other GPU raises (the FP8 policy keeps such
GPUs on BF16). The reference never runs on a GPU.
"""

import torch

from haillm.fp8.gemm import BLOCK, blockwise_fp8_available, device_capability, fp8_gemm_reference
from haillm.fp8.quant import FP8_DTYPE, ceil_div


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
    plan = group_gemm_plan(device_capability(a.device))
    if plan == "reference":
        return fp8_group_gemm_reference(a, a_s, b, b_s, offs).to(out_dtype)
    if plan == "unsupported":
        raise RuntimeError(f"grouped FP8 GEMMs need an SM90 (Hopper) GPU, not {torch.cuda.get_device_name(a.device)}"
                           "; run with fp8.enabled=false")
    from haillm.fp8 import triton_grouped

    return triton_grouped.group_gemm(a, a_s, b, b_s, offs, out_dtype)
