"""Multi-token prediction module (report §2.2): depth k combines the previous depth's hidden state with the
embedding of the token k positions ahead and runs one more transformer block; embedding and output head are
shared with the main model (they are applied by ``DeepSeekV3``).
"""

import torch
from torch import nn

from haillm.models.deepseek_v3.args import ModelArgs
from haillm.ops import Linear, RMSNorm


class MTPModule(nn.Module):
    """``h^k = block(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]))``; logits come from
    ``head(norm(h^k))``.

    Concatenation order is embedding first, as in the released V3 weights (``eh_proj``) and vLLM; the report's
    eq. 21 writes the reverse. For training from scratch either order is equivalent.
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
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.block(self.project(h_prev, emb), cos, sin)
