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
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4
GRAD_AMAX_MIN = 1e-30  # scale 2e-33: still a normal fp32 number


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


def act_quant(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``block`` tiles along the last dim: q is e4m3 like ``x``, s is ``[*x.shape[:-1], ⌈K/block⌉]``."""
    k = x.shape[-1]
    nb = ceil_div(k, block)
    tiles = F.pad(x.float(), (0, nb * block - k)).reshape(*x.shape[:-1], nb, block)
    s = scale_from_amax(tiles.abs().amax(dim=-1), pow2, min_amax)
    q = _to_fp8(tiles / s.unsqueeze(-1)).reshape(*x.shape[:-1], nb * block)[..., :k]
    return q.contiguous(), s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant``: ``q * s`` with each scale broadcast over its tile."""
    k = q.shape[-1]
    return (q.float() * s.repeat_interleave(block, dim=-1)[..., :k]).to(dtype)


def weight_quant(w: torch.Tensor, block: int = 128, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``block`` x ``block`` blocks of a 2-D weight ``[N, K]``: q e4m3 ``[N, K]``, s ``[⌈N/b⌉, ⌈K/b⌉]``."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nbn, nbk = ceil_div(n, block), ceil_div(k, block)
    blocks = F.pad(w.float(), (0, nbk * block - k, 0, nbn * block - n)).reshape(nbn, block, nbk, block)
    s = scale_from_amax(blocks.abs().amax(dim=(1, 3)), pow2)
    q = _to_fp8(blocks / s[:, None, :, None]).reshape(nbn * block, nbk * block)[:n, :k]
    return q.contiguous(), s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``weight_quant``: ``q[i, j] * s[i // block, j // block]``."""
    n, k = q.shape
    full = s.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]
    return (q.float() * full).to(dtype)


def act_quant_t(
    x: torch.Tensor, block: int = 128, pow2: bool = False, min_amax: float = AMAX_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [T, K]`` in 128x1 tiles (along tokens): returns ``act_quant(x.T)``, shapes ``[K, T]`` and
    ``[K, ceil(T/block)]``. Use when the high-precision tensor is at hand (e.g. the output gradient)."""
    if x.dim() != 2:
        raise ValueError(f"act_quant_t expects a 2-D [tokens, channels] tensor, got {tuple(x.shape)}")
    return act_quant(x.t(), block, pow2, min_amax)


def requant_t(
    q: torch.Tensor, s: torch.Tensor, block: int = 128, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-tile an ``act_quant`` result of a 2-D ``[T, K]`` tensor from 1x128 to 128x1 tiles, from FP8 only:
    dequantize, transpose, quantize again. Same output layout as ``act_quant_t``."""
    return act_quant_t(act_dequant(q, s, block), block, pow2)
