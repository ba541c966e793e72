"""Triton kernels for ``haillm.fp8.fused``: RMSNorm and SwiGLU that also write the 1x128 FP8 copy of their output.

``fused.py`` is the definition, the autograd and the CPU path; it calls these kernels on CUDA tensors
(``fused.kernel_applies``). Like ``triton_quant`` this module imports Triton at import time and is only
imported when a CUDA tensor is normalized or gated.

Each kernel reads its input once and writes the output in the input's dtype and, from the output as stored
(rounded to that dtype, then widened to fp32 exactly), the FP8 copy and its scales with the very steps of
``triton_quant`` (``_scale``, ``_to_fp8``): the pair is bitwise ``act_quant_reference`` of the output.
- RMSNorm: a program holds ``BLOCK_T`` whole rows (padded with zeros to a power of two, at least 128 wide),
  so the mean of squares needs no second read; ``rstd`` (fp32, for backward) is written too. The steps are
  torch's: ``rstd = 1 / sqrt(sum(x^2) / K + eps)`` (each step IEEE-rounded), then ``(x * rstd) * w`` in fp32,
  cast to the output dtype.
- SwiGLU: a program holds a [``ROW_TOKENS``, 128] tile of ``a`` and ``b``; ``silu(a) = a / (1 + exp(-a))`` in
  fp32 rounded to the input dtype (as torch's ``F.silu``), then the product rounded again (as torch's ``*``).

Partial last tiles (any row width) are zero-padded, which raises no amax. Inputs may have any 2-D strides;
outputs are contiguous. Offsets are 64-bit.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from haillm.fp8.quant import AMAX_MIN, FP8_DTYPE, ceil_div
from haillm.fp8.triton_quant import BLOCK, ROW_TOKENS, _max_keep_nan, _scale, _to_fp8

NORM_ELEMENTS = 4096  # elements of x per RMSNorm program (whole rows; one row when wider)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, q_ptr, s_ptr, T, K, stride_xt, stride_xk, stride_w, eps, min_amax,
    BLOCK_T: tl.constexpr, WIDTH: tl.constexpr, POW2: tl.constexpr,
):
    """Rows ``[pid * BLOCK_T, +BLOCK_T)`` of ``x [T, K]``, whole (``WIDTH >= K``): ``y``, ``rstd [T]`` and the FP8
    copy of ``y``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, WIDTH).to(tl.int64)
    row_ok, col_ok = rows < T, cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, 1), tl.cast(K, tl.float32)) + eps))
    y = ((x * rstd[:, None]) * w[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y, mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    tiles = tl.reshape(y.to(tl.float32), (BLOCK_T, WIDTH // 128, 128))
    s = _scale(tl.reduce(tl.abs(tiles), 2, _max_keep_nan), min_amax, POW2)
    q = tl.reshape(_to_fp8(tl.div_rn(tiles, s[:, :, None])), (BLOCK_T, WIDTH))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
    tile_ids = tl.arange(0, WIDTH // 128)
    tl.store(s_ptr + rows[:, None] * tl.cdiv(K, 128) + tile_ids[None, :], s,
             mask=row_ok[:, None] & (tile_ids * 128 < K)[None, :])


@triton.jit
def _swiglu_kernel(
    a_ptr, b_ptr, h_ptr, q_ptr, s_ptr, T, K, stride_at, stride_ak, stride_bt, stride_bk, min_amax,
    BLOCK_T: tl.constexpr, POW2: tl.constexpr,
):
    """One [BLOCK_T, 128] tile: ``h = silu(a) * b`` and its 1x128 FP8 tiles."""
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_k.to(tl.int64) * 128 + tl.arange(0, 128)
    row_ok, col_ok = rows < T, cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_at + cols[None, :] * stride_ak, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_bt + cols[None, :] * stride_bk, mask=mask, other=0.0).to(tl.float32)
    silu = tl.div_rn(a, 1.0 + libdevice.exp(-a)).to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (silu * b).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * K + cols[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    s = _scale(tl.reduce(tl.abs(hf), 1, _max_keep_nan), min_amax, POW2)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _to_fp8(tl.div_rn(hf, s[:, None])), mask=mask)
    tl.store(s_ptr + rows * tl.cdiv(K, 128) + pid_k, s, mask=row_ok)


def _fp8_outputs(t: int, k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty(t, k, dtype=like.dtype, device=like.device)
    q = torch.empty(t, k, dtype=FP8_DTYPE, device=like.device)
    return out, q, torch.empty(t, ceil_div(k, BLOCK), dtype=torch.float32, device=like.device)


def _shaped(x: torch.Tensor, *outs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs ``[T, n]`` back to ``x``'s leading dims."""
    return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in outs)


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, pow2: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, rstd, y_q, y_s)`` of a CUDA ``x [..., K]``: ``y`` in x's dtype, ``rstd [..., 1]`` fp32."""
    x2 = x.reshape(-1, x.shape[-1])
    t, k = x2.shape
    y, q, s = _fp8_outputs(t, k, x2)
    rstd = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    width = max(BLOCK, triton.next_power_of_2(k))
    block_t = max(1, NORM_ELEMENTS // width)
    _rmsnorm_kernel[(triton.cdiv(t, block_t),)](
        x2, weight, y, rstd, q, s, t, k, *x2.stride(), weight.stride(0), eps, AMAX_MIN,
        BLOCK_T=block_t, WIDTH=width, POW2=pow2, num_warps=8 if width >= 4096 else 4,
    )
    return _shaped(x, y, rstd, q, s)


def swiglu_act_quant(a: torch.Tensor, b: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, h_q, h_s)`` of CUDA ``a``, ``b`` of one shape ``[..., K]`` and dtype: ``h`` in that dtype."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    t, k = a2.shape
    h, q, s = _fp8_outputs(t, k, a2)
    _swiglu_kernel[(triton.cdiv(t, ROW_TOKENS), triton.cdiv(k, BLOCK))](
        a2, b2, h, q, s, t, k, *a2.stride(), *b2.stride(), AMAX_MIN, BLOCK_T=ROW_TOKENS, POW2=pow2, num_warps=4,
    )
    return _shaped(a, h, q, s)
