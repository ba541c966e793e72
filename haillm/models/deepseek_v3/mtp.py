"""Multi-token prediction module (report §2.2): depth k combines the previous depth's hidden state with the
embedding of the token k positions ahead and runs one more transformer block; embedding and output head are
shared with the main model (they are applied by ``DeepSeekV3``).
"""

import torch
from torch import nn

from haillm.fp8.fused import fp8_input_pow2, normed
from haillm.fp8.gemm import BLOCK
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.ops import Linear, RMSNorm


class MTPModule(nn.Module):
    """``h^k = block(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]))``; logits come from
    ``head(norm(h^k))``.

    Concatenation order is embedding first, as in the released V3 weights (``eh_proj``) and vLLM; the report's
    eq. 21 writes the reverse. For training from scratch either order is equivalent.

    With ``eh_proj`` in FP8 and ``dim`` a multiple of 128, ``enorm`` and ``hnorm`` quantize their outputs
    (``fp8.fused.normed``) and ``eh_proj`` takes the two FP8 copies side by side: no 1x128 tile crosses the
    seam, so that is bitwise ``act_quant`` of the concatenation.
    """

    def __init__(self, args: ModelArgs, block: nn.Module) -> None:
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.eh_proj = Linear(2 * args.dim, args.dim)
        self.block = block
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)  # shared_head.norm in the HF checkpoint

    def project(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The block's input. ``h_prev``, ``emb``: ``[B, T', dim]`` aligned so position i holds ``h^{k-1}_i``
        and ``Emb(t_{i+k})``."""
        pow2 = fp8_input_pow2([self.eh_proj]) if self.enorm.dim % BLOCK == 0 else None
        (e, e_fp8), (h, h_fp8) = normed(self.enorm, emb, pow2), normed(self.hnorm, h_prev, pow2)
        x_fp8 = None if pow2 is None else tuple(torch.cat(pair, dim=-1) for pair in zip(e_fp8, h_fp8, strict=True))
        return self.eh_proj(torch.cat([e, h], dim=-1), x_fp8)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.block(self.project(h_prev, emb), cos, sin)
