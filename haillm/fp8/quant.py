"""Fine-grained FP8 (E4M3) quantization as in DeepSeek-V3 training.

Activations are scaled per 1x128 tile along the last dimension (one token, 128 channels); weights per
128x128 block. The scale of a tile is ``amax / 448`` (E4M3's largest finite value) with ``amax`` clamped
to at least ``min_amax``, optionally rounded up to a power of two (``pow2``, DeepSeek's "ue8m0" format).
Activations and weights use DeepGEMM's floor ``AMAX_MIN = 1e-4``. Gradients use ``GRAD_AMAX_MIN``, which
only keeps an all-zero tile from dividing by zero: without loss scaling, gradient magnitude falls with the
token count and depth, and a 1e-4 floor coarsened or flushed about half of the tiny model's output-gradient
tiles (52% of its Wgrad tiles at 1,024 tokens per micro-batch).
Dequantization is ``q * s``. Finite inputs never give NaN or inf: the value cast to E4M3 is clamped to
±448 first. A non-finite input yields NaN in its tile, which surfaces a divergence instead of hiding it.
Every function is vectorised: inputs are zero-padded to whole tiles (zeros never raise an amax) and
reshaped, so a partial last tile is handled like any other.

Backward needs activations tiled along the token dimension instead (128x1 tiles of ``x``, i.e. 1x128
tiles of ``x.T``): ``act_quant_t`` derives them from the high-precision tensor, ``requant_t`` from the
cached FP8 copy by dequantize + requantize, which is what DeepSeek does for activations cached in FP8.
With power-of-two scales that re-tiling is exact except where a value falls below E4M3's normal range in
its new tile (the new scale is a power-of-two multiple of the old one, so only the exponent moves).

Each public function runs a Triton kernel on a CUDA tensor (``haillm.fp8.triton_quant``, bitwise equal, see
``quant_kernel_applies``; ``dequant_kernel_applies`` for ``act_dequant``, whose kernel writes its dtype
directly, without the reference's fp32 temporaries) and its ``*_reference`` twin, plain torch and the definition,
everywhere else.
``act_quant_with_t`` and ``weight_quant_with_t`` also return the transposed copy (128x1 activation tiles
for Wgrad, ``W.T``'s blocks for Dgrad), written by the same kernel from one read of the input.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4
GRAD_AMAX_MIN = 1e-30  # scale 2e-33: still a normal fp32 number
KERNEL_MIN_AMAX = FP8_MAX * 2.0**-116  # smallest floor the kernels take (denormals, see triton_quant)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)  # widened to fp32 exactly
_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the dequantization kernel writes
Fp8Pair = tuple[torch.Tensor, torch.Tensor]  # (q, s): an FP8 tensor and its scales, as act_quant returns them


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_from_amax(amax: torch.Tensor, pow2: bool = False, min_amax: float = AMAX_MIN) -> torch.Tensor:
    """``max(amax, min_amax) / 448`` in fp32, rounded up to an exact power of two when ``pow2``."""
    s = amax.float().clamp(min=min_amax) / FP8_MAX
    if pow2:
        # frexp: s = m * 2**e with m in [0.5, 1); s is already a power of two exactly when m == 0.5.
        m, e = torch.frexp(s)
        s = torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))
    return s


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    # Clamp first: casts of out-of-range values to e4m3fn are not saturating on every backend.
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@functools.cache
def _triton_on(device_index: int) -> bool:
    # Triton casts to E4M3 natively from SM89 (Ada, Hopper) on.
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device_index) >= (8, 9)


def quant_kernel_applies(x: torch.Tensor, block: int = 128, min_amax: float = AMAX_MIN) -> bool:
    """Whether ``x`` is quantized by the Triton kernels: a non-empty fp32/bf16/fp16/e4m3 CUDA tensor on an SM89+
    GPU with Triton installed, 128-wide tiles and a floor of at least ``KERNEL_MIN_AMAX``."""
    return (x.is_cuda and block == 128 and x.dtype in _KERNEL_DTYPES and x.numel() > 0
            and min_amax >= KERNEL_MIN_AMAX and _triton_on(x.get_device()))


def dequant_kernel_applies(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype=torch.float32) -> bool:
    """Whether ``act_dequant`` runs the Triton kernel: ``quant_kernel_applies`` to an e4m3 ``q`` of any shape,
    fp32 scales ``[*q.shape[:-1], ⌈K/128⌉]`` on its device, output fp32/bf16/fp16."""
    return (q.dtype == FP8_DTYPE and q.dim() > 0 and s.dtype == torch.float32 and s.device == q.device
            and tuple(s.shape) == (*q.shape[:-1], ceil_div(q.shape[-1], block)) and dtype in _DEQUANT_DTYPES
            and quant_kernel_applies(q, block))


def act_quant_reference(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``block`` tiles along the last dim: q is e4m3 like ``x``, s is ``[*x.shape[:-1], ⌈K/block⌉]``."""
    k = x.shape[-1]
    nb = ceil_div(k, block)
    tiles = F.pad(x.float(), (0, nb * block - k)).reshape(*x.shape[:-1], nb, block)
    s = scale_from_amax(tiles.abs().amax(dim=-1), pow2, min_amax)
    q = _to_fp8(tiles / s.unsqueeze(-1)).reshape(*x.shape[:-1], nb * block)[..., :k]
    return q.contiguous(), s


def act_dequant_reference(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant``: ``q * s`` in fp32 with each scale broadcast over its tile, cast to ``dtype``."""
    k = q.shape[-1]
    if k % block == 0:  # whole tiles: broadcast each scale over its tile, no [.., K] scale temporary
        return (q.float().unflatten(-1, (k // block, block)) * s.unsqueeze(-1)).flatten(-2).to(dtype)
    return (q.float() * s.repeat_interleave(block, dim=-1)[..., :k]).to(dtype)


def weight_quant_reference(
    w: torch.Tensor, block: int = 128, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block`` x ``block`` blocks of a weight ``[N, K]``, or of every weight of a stack ``[G, N, K]`` (each
    weight zero-padded to whole blocks on its own, so no block straddles two weights): q e4m3 like ``w``,
    s ``[(G,) ⌈N/b⌉, ⌈K/b⌉]``."""
    if w.dim() not in (2, 3):
        raise ValueError(f"weight_quant expects a 2-D weight or a 3-D stack of weights, got shape {tuple(w.shape)}")
    *stack, n, k = w.shape
    nbn, nbk = ceil_div(n, block), ceil_div(k, block)
    blocks = F.pad(w.float(), (0, nbk * block - k, 0, nbn * block - n)).reshape(*stack, nbn, block, nbk, block)
    s = scale_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2)
    q = _to_fp8(blocks / s[..., :, None, :, None]).reshape(*stack, nbn * block, nbk * block)[..., :n, :k]
    q = q.contiguous()  # a view when only N was padded: copy, so the cached weight does not hold the padding
    return (q.clone() if q.untyped_storage().nbytes() > q.nbytes else q), s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``weight_quant`` (a weight or a stack): ``q[..., i, j] * s[..., i // block, j // block]``."""
    n, k = q.shape[-2:]
    full = s.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
    return (q.float() * full).to(dtype)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} expects a 2-D [tokens, channels] tensor, got {tuple(x.shape)}")


def act_quant_t_reference(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [T, K]`` in 128x1 tiles (along tokens): returns ``act_quant(x.T)``, shapes ``[K, T]`` and
    ``[K, ceil(T/block)]``. Use when the high-precision tensor is at hand (e.g. the output gradient)."""
    _check_2d("act_quant_t", x)
    return act_quant_reference(x.t(), block, pow2, min_amax)


def requant_t_reference(
    q: torch.Tensor, s: torch.Tensor, block: int = 128, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-tile an ``act_quant`` result of a 2-D ``[T, K]`` tensor from 1x128 to 128x1 tiles, from FP8 only:
    dequantize, transpose, quantize again. Same output layout as ``act_quant_t``."""
    return act_quant_t_reference(act_dequant_reference(q, s, block), block, pow2)


def act_quant_with_t_reference(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(*act_quant_reference(x), *act_quant_t_reference(x))``."""
    return (*act_quant_reference(x, block, pow2, min_amax), *act_quant_t_reference(x, block, pow2, min_amax))


def weight_quant_with_t_reference(
    w: torch.Tensor, block: int = 128, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight_quant_reference(w)`` and its transpose, contiguous: ``(q.T, s.T)`` of a weight, ``(q[g].T,
    s[g].T)`` of every weight of a stack."""
    q, s = weight_quant_reference(w, block, pow2)
    return q, s, q.transpose(-2, -1).contiguous(), s.transpose(-2, -1).contiguous()


def act_quant(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant_reference``: q e4m3 like ``x``, s ``[*x.shape[:-1], ⌈K/block⌉]``; a kernel on the GPU."""
    if quant_kernel_applies(x, block, min_amax):
        from haillm.fp8 import triton_quant

        return triton_quant.act_quant(x, pow2, min_amax)
    return act_quant_reference(x, block, pow2, min_amax)


def act_quant_t(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant_t_reference``: ``act_quant(x.T)`` of ``x [T, K]``; on the GPU one kernel reading ``x``."""
    _check_2d("act_quant_t", x)
    if quant_kernel_applies(x, block, min_amax):
        from haillm.fp8 import triton_quant

        return triton_quant.act_quant_t(x, pow2, min_amax)
    return act_quant_t_reference(x, block, pow2, min_amax)


def act_quant_with_t(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(*act_quant(x), *act_quant_t(x))`` of ``x [T, K]``: the 1x128 copy (Fprop, Dgrad) and the 128x1 copy
    (Wgrad) of one high-precision tensor, such as an output gradient; on the GPU from one read of ``x``."""
    _check_2d("act_quant_with_t", x)
    if quant_kernel_applies(x, block, min_amax):
        from haillm.fp8 import triton_quant

        return triton_quant.act_quant_with_t(x, pow2, min_amax)
    return act_quant_with_t_reference(x, block, pow2, min_amax)


def act_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """``act_dequant_reference``; on the GPU one kernel writing ``dtype`` directly, without the reference's fp32
    ``[.., K]`` temporaries (the BF16 Wgrad operand, the FP8 dispatch payload)."""
    if dequant_kernel_applies(q, s, block, dtype):
        from haillm.fp8 import triton_quant

        return triton_quant.act_dequant(q, s, dtype)
    return act_dequant_reference(q, s, block, dtype)


def requant_t(
    q: torch.Tensor, s: torch.Tensor, block: int = 128, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``requant_t_reference``: the 128x1 re-tiling of an FP8 1x128 pair; on the GPU one kernel."""
    if (q.dim() == 2 and q.dtype == FP8_DTYPE and s.dtype == torch.float32
            and tuple(s.shape) == (q.shape[0], ceil_div(q.shape[1], block))
            and quant_kernel_applies(q, block)):
        from haillm.fp8 import triton_quant

        return triton_quant.requant_t(q, s, pow2)
    return requant_t_reference(q, s, block, pow2)


def weight_quant(w: torch.Tensor, block: int = 128, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_quant_reference`` of a weight ``[N, K]`` or a stack ``[G, N, K]``: q e4m3 like ``w``, s
    ``[(G,) ⌈N/b⌉, ⌈K/b⌉]``; a kernel on the GPU."""
    if w.dim() in (2, 3) and quant_kernel_applies(w, block):
        from haillm.fp8 import triton_quant

        if w.dim() == 3:
            return triton_quant.weight_quant_stack(w, pow2)
        return triton_quant.weight_quant(w, pow2, transposed=False)
    return weight_quant_reference(w, block, pow2)


def weight_quant_with_t(
    w: torch.Tensor, block: int = 128, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, s, q.T, s.T)`` of ``weight_quant(w)`` for a weight ``[N, K]`` (all contiguous) or a stack ``[G, N, K]``
    (``q[g].T``, ``s[g].T`` per weight): the Dgrad operand ``W.T`` in 128x128 blocks is the transposed FP8
    weight (square blocks), stored K-major as FP8 GEMMs read it, written by the same kernel on the GPU (for a
    stack, a ``[G, K, N]`` view of one ``[K, G * N']`` array, ``N'`` being ``N`` in whole blocks)."""
    if w.dim() in (2, 3) and quant_kernel_applies(w, block):
        from haillm.fp8 import triton_quant

        if w.dim() == 3:
            return triton_quant.weight_quant_stack(w, pow2, transposed=True)
        return triton_quant.weight_quant(w, pow2, transposed=True)
    return weight_quant_with_t_reference(w, block, pow2)
