"""Triton kernels for the FP8 quantization of ``haillm.fp8.quant``, bitwise equal to its torch reference.

``quant.py`` is the definition and the CPU path; its public functions call these kernels on CUDA tensors
(``quant.quant_kernel_applies`` is the rule). This module imports Triton at import time and is itself only
imported when a CUDA tensor is quantized.

Why our own kernels. What the well-kept libraries ship for this recipe computes other numbers:
- torchao ``prototype/blockwise_fp8_training/kernels.py``: multiplier ``448 / amax`` (in fp64, rounded to
  fp32) then ``x * multiplier``, reciprocal stored as the scale, amax floor 1e-12, no power-of-two option,
  dimensions must be multiples of 128; the 1x128 and 128x1 copies are separate kernels (two reads).
- TransformerEngine's blockwise recipe (``recipe_common.cuh``): ``448 / amax`` (``__fdiv_rn``) and a multiply
  too; power-of-two scales by truncating that multiplier, a non-finite amax gives scale 1; a CUDA extension
  the GPU machine does not have and cannot download.
- Liger-Kernel has no FP8 quantization op.
``x * (448 / amax)`` and ``x / (amax / 448)`` round differently, so none of these is our reference; DeepSeek's
own ``inference/kernel.py`` divides like ours but needs ``K % 128 == 0``, contiguous input, no 128x1 copy.

Exactness, per step of the reference: amax is a max of absolute values (exact in any order; the reduction
propagates NaN like ``torch.amax``); the clamp to ``min_amax`` (an fp32 number, as torch's clamp takes it)
keeps NaN; ``amax / 448`` and ``x / s`` are IEEE round-to-nearest divisions (``tl.div_rn``, not ``/``, which
Triton lowers to an approximate division); ``pow2`` rounds the fp32 scale up to a power of two on its bits,
which is what ``frexp``/``ldexp`` do for a normal scale, and gives 1 for a non-finite scale (frexp's exponent
0 there, a quirk of the reference kept as is); values are clamped to ±448 with NaN kept, then cast with
round-to-nearest-even (``cvt.rn.satfinite`` on SM89+, one rounding from fp32 like torch's cast). bf16/fp16
inputs are widened to fp32 exactly. Libdevice may flush fp32 denormals; that changes no byte as long as
every scale is at least 2^-116 (an fp32 input below 2^-126 then quantizes to zero either way), hence
``KERNEL_MIN_AMAX``. NaN bytes are NaN in both, but their sign bit is not part of the contract.

Dequantization (``act_dequant``, for BF16 Wgrad and the FP8 dispatch payload) widens e4m3 to fp32 exactly,
multiplies by the tile's scale in fp32 (PTX ``mul.f32``: round to nearest, no ``.ftz``, no add to fuse
with, as torch) and casts once, round-to-nearest-even, to the output dtype: the reference's bits without its
fp32 ``[rows, K]`` temporaries (one read of the FP8 bytes, one write). NaN stays NaN, payload aside.

Layouts: the input may have any 2-D strides (``x.t()`` included); a stack of weights ``[G, N, K]`` goes through
the 2-D weight kernel (``weight_quant_stack``); every output is contiguous, as the
reference's. Offsets are 64-bit.
"""

import torch
import triton
import triton.language as tl

from haillm.fp8.quant import AMAX_MIN, FP8_DTYPE, ceil_div

BLOCK = 128
ROW_TOKENS = 32  # tokens per program when only the 1x128 copy is written


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scale(amax, min_amax, POW2: tl.constexpr):
    """``scale_from_amax``: ``max(amax, min_amax) / 448``, rounded up to a power of two when ``POW2``."""
    s = tl.div_rn(tl.maximum(amax, min_amax, propagate_nan=tl.PropagateNan.ALL), 448.0)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        up = ((bits + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True)  # s > 0: next power of two >= s
        s = tl.where((bits & 0x7F800000) == 0x7F800000, 1.0, up)
    return s


@triton.jit
def _to_fp8(y):
    """``quant._to_fp8``: clamp to ±448 (NaN kept), then round to nearest even."""
    y = tl.minimum(tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _act_kernel(
    x_ptr, xs_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
    T, K, stride_xt, stride_xk, stride_xst, stride_xsk, min_amax,
    BLOCK_T: tl.constexpr, POW2: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr, FROM_FP8: tl.constexpr,
):
    """One [BLOCK_T tokens, 128 channels] tile of ``x [T, K]`` read once. ``ROW``: its 1x128 tiles to
    ``q [T, K]``, ``s [T, ceil(K/128)]``. ``COL`` (BLOCK_T = 128): its 128x1 tiles, i.e. ``act_quant(x.T)``,
    to ``qt [K, T]``, ``st [K, ceil(T/128)]``. ``FROM_FP8`` (with ``COL`` only): ``x`` is an FP8 1x128 copy
    with scales ``xs``, dequantized first (``act_dequant``)."""
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_k.to(tl.int64) * 128 + tl.arange(0, 128)
    row_ok, col_ok = rows < T, cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if FROM_FP8:
        xs = tl.load(xs_ptr + rows * stride_xst + pid_k * stride_xsk, mask=row_ok, other=0.0)
        x = x * xs[:, None]  # padded tokens read 0 * 0; padded channels are columns COL never stores
    if ROW:
        s = _scale(tl.reduce(tl.abs(x), 1, _max_keep_nan), min_amax, POW2)
        q = _to_fp8(tl.div_rn(x, s[:, None]))
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
        tl.store(s_ptr + rows * tl.cdiv(K, 128) + pid_k, s, mask=row_ok)
    if COL:
        st = _scale(tl.reduce(tl.abs(x), 0, _max_keep_nan), min_amax, POW2)
        qt = tl.trans(_to_fp8(tl.div_rn(x, st[None, :])))
        tl.store(qt_ptr + cols[:, None] * T + rows[None, :], qt, mask=col_ok[:, None] & row_ok[None, :])
        tl.store(st_ptr + cols * tl.cdiv(T, 128) + pid_t, st, mask=col_ok)


@triton.jit
def _weight_kernel(
    w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, stride_wn, stride_wk, min_amax,
    POW2: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """One 128x128 block of ``w [N, K]``: ``q [N, K]``, ``s [ceil(N/128), ceil(K/128)]`` and, when
    ``TRANSPOSED``, the same block transposed into ``qt [K, N]``, ``st = s.T``."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n.to(tl.int64) * 128 + tl.arange(0, 128)
    cols = pid_k.to(tl.int64) * 128 + tl.arange(0, 128)
    row_ok, col_ok = rows < N, cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = _scale(tl.reduce(tl.reduce(tl.abs(w), 1, _max_keep_nan), 0, _max_keep_nan), min_amax, POW2)
    q = _to_fp8(tl.div_rn(w, s))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, 128) + pid_k, s)
    if TRANSPOSED:
        tl.store(qt_ptr + cols[:, None] * N + rows[None, :], tl.trans(q), mask=col_ok[:, None] & row_ok[None, :])
        tl.store(st_ptr + pid_k * tl.cdiv(N, 128) + pid_n, s)


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, y_ptr, T, K, stride_qt, stride_qk, stride_st, stride_sk, BLOCK_T: tl.constexpr,
):
    """``y [T, K] = q * s`` for one [BLOCK_T tokens, 128 channels] tile: fp32 product, one cast to ``y``'s dtype."""
    pid_t, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_k * 128 + tl.arange(0, 128)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + cols[None, :] * stride_qk, mask=mask, other=0.0)
    s = tl.load(s_ptr + rows * stride_st + pid_k * stride_sk, mask=row_ok, other=0.0)
    y = q.to(tl.float32) * s[:, None]
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _empty_pair(rows: int, cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=like.device)
    return q, torch.empty(rows, ceil_div(cols, BLOCK), dtype=torch.float32, device=like.device)


def _launch_act(
    x: torch.Tensor, x_s: torch.Tensor | None, pow2: bool, min_amax: float, row: bool, col: bool
) -> tuple[torch.Tensor | None, ...]:
    t, k = x.shape
    q, s = _empty_pair(t, k, x) if row else (None, None)
    qt, st = _empty_pair(k, t, x) if col else (None, None)
    block_t = BLOCK if col else ROW_TOKENS
    xs_strides = x_s.stride() if x_s is not None else (0, 0)
    _act_kernel[(triton.cdiv(t, block_t), triton.cdiv(k, BLOCK))](
        x, x_s, q, s, qt, st, t, k, *x.stride(), *xs_strides, min_amax,
        BLOCK_T=block_t, POW2=pow2, ROW=row, COL=col, FROM_FP8=x_s is not None, num_warps=8 if col else 4,
    )
    return q, s, qt, st


def act_quant(x: torch.Tensor, pow2: bool, min_amax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.act_quant`` (block 128) of a CUDA tensor of any shape."""
    q, s, _, _ = _launch_act(x.reshape(-1, x.shape[-1]), None, pow2, min_amax, row=True, col=False)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def act_quant_t(x: torch.Tensor, pow2: bool, min_amax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.act_quant_t`` of a 2-D CUDA tensor: 128x1 tiles, read along ``x``'s rows."""
    _, _, qt, st = _launch_act(x, None, pow2, min_amax, row=False, col=True)
    return qt, st


def act_quant_with_t(x: torch.Tensor, pow2: bool, min_amax: float) -> tuple[torch.Tensor, ...]:
    """``act_quant(x)`` and ``act_quant_t(x)`` of a 2-D CUDA tensor from one read of ``x``."""
    return _launch_act(x, None, pow2, min_amax, row=True, col=True)


def requant_t(q: torch.Tensor, s: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.requant_t``: the 128x1 tiles of ``act_dequant(q, s)`` (floor ``AMAX_MIN``), from FP8 only."""
    _, _, qt, st = _launch_act(q, s, pow2, AMAX_MIN, row=False, col=True)
    return qt, st


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``quant.act_dequant`` (block 128) of an e4m3 CUDA tensor of any shape, written contiguous in ``dtype``."""
    k = q.shape[-1]
    q2, s2 = q.reshape(-1, k), s.reshape(-1, s.shape[-1])
    y = torch.empty(q2.shape, dtype=dtype, device=q.device)
    _dequant_kernel[(triton.cdiv(q2.shape[0], ROW_TOKENS), triton.cdiv(k, BLOCK))](
        q2, s2, y, q2.shape[0], k, *q2.stride(), *s2.stride(), BLOCK_T=ROW_TOKENS, num_warps=4
    )
    return y.view(q.shape)


def weight_quant(w: torch.Tensor, pow2: bool, transposed: bool) -> tuple[torch.Tensor, ...]:
    """``quant.weight_quant`` of a 2-D CUDA weight; with ``transposed`` also ``q.T`` and ``s.T``, contiguous."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(ceil_div(n, BLOCK), ceil_div(k, BLOCK), dtype=torch.float32, device=w.device)
    qt = torch.empty(k, n, dtype=FP8_DTYPE, device=w.device) if transposed else q
    st = torch.empty(s.shape[1], s.shape[0], dtype=torch.float32, device=w.device) if transposed else s
    _weight_kernel[(s.shape[0], s.shape[1])](
        w, q, s, qt, st, n, k, *w.stride(), AMAX_MIN, POW2=pow2, TRANSPOSED=transposed, num_warps=8
    )
    return (q, s, qt, st) if transposed else (q, s)



def weight_quant_stack(w: torch.Tensor, pow2: bool, transposed: bool = False) -> tuple[torch.Tensor, ...]:
    """``quant.weight_quant`` of a ``[G, N, K]`` CUDA stack through the 2-D kernel on ``[G * N', K]``, ``N'`` being
    ``N`` rounded up to whole blocks: when ``N`` is not a multiple of 128 each weight gets zero rows of its own
    first (zeros raise no amax), so no block straddles two weights. With ``transposed`` also every ``W[g].T``
    and its scales, as ``[G, K, N]`` and ``[G, ⌈K/128⌉, ⌈N/128⌉]`` views of the kernel's transposed ``[K, G * N']``
    output: each weight's transpose K-major (unit stride along ``N``), with no copy."""
    g, n, k = w.shape
    n_pad = ceil_div(n, BLOCK) * BLOCK
    if n_pad != n:
        padded = w.new_zeros(g, n_pad, k)
        padded[:, :n] = w
        w = padded
    q, s, *t = weight_quant(w.reshape(g * n_pad, k), pow2, transposed)
    q = q.view(g, n_pad, k)
    stack = (q if n_pad == n else q[:, :n].contiguous()), s.view(g, n_pad // BLOCK, s.shape[1])
    if not transposed:
        return stack
    qt, st = t
    return (*stack, qt.view(k, g, n_pad).permute(1, 0, 2)[:, :, :n],
            st.view(st.shape[0], g, n_pad // BLOCK).permute(1, 0, 2))
