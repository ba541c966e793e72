"""Multi-head Latent Attention (report §2.1.1) with interleaved-pair RoPE and YaRN.

Training runs the "naive" form: keys/values are expanded from the latent per head and fed to
``F.scaled_dot_product_attention``. Inference runs the "absorbed" form: ``W^UK`` is folded into the query and
``W^UV`` into the output, so only the normalised ``kv_lora_rank`` latent and the shared rotated
``qk_rope_head_dim`` key are cached per token.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from haillm.fp8.fused import fp8_input_pow2, normed
from haillm.fp8.quant import Fp8Pair, act_quant
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.ops import Linear, RMSNorm, precision
from haillm.ops.graph_breaks import eager_in_compiled_regions
from haillm.ops.recompute import mark_outputs, recomputable, source
from haillm.parallel.context import NO_CP, PendingGather
from haillm.parallel.tensor import NO_TP


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(args: ModelArgs) -> float:
    """``1/sqrt(qk_head_dim)``, times ``m(f, mscale_all_dim)^2`` under YaRN (see ``ModelArgs``)."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if args.uses_yarn and args.mscale_all_dim:
        scale *= _yarn_mscale(args.rope_factor, args.mscale_all_dim) ** 2
    return scale


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of the rope dims; under YaRN, blended between original and ``1/rope_factor``-scaled
    ones by a linear ramp over the correction range [low, high] given by beta_fast and beta_slow."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if not args.uses_yarn:
        return inv_freq

    def correction_dim(n_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: fully interpolated
    return 1.0 / (args.rope_factor * pos_freqs) * (1 - keep) + inv_freq * keep


def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of shape ``[max_seq_len, qk_rope_head_dim // 2]`` in fp32, including the YaRN
    rotary attention factor (Hugging Face scales cos/sin by it)."""
    freqs = torch.arange(args.max_seq_len, dtype=torch.float32)[:, None] * rope_inv_freq(args)[None, :]
    factor = 1.0
    if args.uses_yarn:
        if args.mscale and args.mscale_all_dim:
            factor = _yarn_mscale(args.rope_factor, args.mscale) / _yarn_mscale(args.rope_factor, args.mscale_all_dim)
        else:
            factor = _yarn_mscale(args.rope_factor, 1.0)
    return (freqs.cos() * factor).to(device), (freqs.sin() * factor).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` of ``x: [B, T, H, r]`` by angle j (DeepSeek's interleaved
    layout); ``cos``/``sin`` are ``[T, r/2]``. Done as one complex product (faster than the real form)."""
    if x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs even strides and offset
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotation = torch.complex(cos.float(), sin.float())[:, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def _head_outputs(o: torch.Tensor, v_dim: int, pow2: bool | None) -> tuple[torch.Tensor, ...]:
    """``(wo's input [B, T, H * v_dim],)`` from attention's output ``o: [B, H, T, d >= v_dim]``, with its FP8
    copy after it where ``pow2`` is not None; also the recipe of what ``wo`` saves."""
    heads = o[..., :v_dim].transpose(1, 2).flatten(2)
    return (heads,) if pow2 is None else (heads, *act_quant(heads.detach(), pow2=pow2))


class MLA(nn.Module):
    """Attention with low-rank query/key-value compression and one decoupled RoPE key shared by all heads.

    ``wq_b``/``wq`` give per head ``[q_nope ; q_rope]``; ``wkv_a`` gives ``[latent (kv_lora_rank) ; k_rope]``;
    ``wkv_b`` gives per head ``[k_nope ; v]``. With ``recompute_up_proj`` the attention inputs made by
    ``up_project`` are recomputed in backward from the latents (``haillm.ops.recompute``) instead of kept.
    ``forward`` may get the FP8 copy of its input from the norm before it (``fp8_input_pow2`` says which);
    ``q_norm`` and ``kv_norm`` likewise quantize their outputs for an FP8 ``wq_b`` and ``wkv_b``.

    Tensor parallel (``self.tp``, ``haillm.parallel.tensor_plan``): each rank holds ``n_heads / tp`` heads of
    the up-projections and of ``wo``; the down-projections run on the input as it comes (a sequence shard
    under sequence parallelism) and their latents enter the region, so the norms of the latents and the
    attention see whole sequences; ``wo``'s partial sums leave it.
    """

    forward_methods = ("forward_absorbed",)  # reads wkv_b.weight outside __call__ (ZeroAdamW.register_forward_wait)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk_head_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, self.n_heads * qk_head_dim)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * qk_head_dim)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.rope_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.wo = Linear(self.n_heads * self.v_dim, args.dim)
        self.softmax_scale = softmax_scale(args)
        self.recompute_up_proj = False
        self.tp = NO_TP
        self.cp = NO_CP

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._query_heads(x if self.q_lora_rank == 0 else self.wq_a(x), cos, sin)

    @property
    def fp8_input_pow2(self) -> bool | None:
        """``fp8.fused.fp8_input_pow2`` of the linears reading the input: ``wq`` or ``wq_a``, and ``wkv_a``."""
        return fp8_input_pow2([self.wq if self.q_lora_rank == 0 else self.wq_a, self.wkv_a])

    def _query_heads(self, q_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_in_fp8: Fp8Pair | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_lora_rank == 0:
            q = self.wq(q_in, q_in_fp8)
        else:
            q = self.wq_b(*normed(self.q_norm, q_in, fp8_input_pow2([self.wq_b])))
        q_nope, q_rope = q.unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latents(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pow2: bool | None = None
                 ) -> tuple[torch.Tensor, Fp8Pair | None, torch.Tensor]:
        """Normalised KV latent ``[B, T, kv_lora_rank]`` (with its FP8 copy when ``pow2`` is not None, see
        ``fp8.fused.normed``) and rotated shared key ``[B, T, rope_dim]`` from ``kv = wkv_a(x)``."""
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return *normed(self.kv_norm, latent, pow2), apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)

    def up_project(self, q_in: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_in_fp8: Fp8Pair | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head ``q, k, v`` as attention takes them (``[B, H, T, d]``) from the query latent (``x`` when
        ``q_lora_rank`` is 0, then maybe with its FP8 copy ``q_in_fp8``) and ``kv = wkv_a(x)``: the MLA
        up-projections."""
        q_nope, q_rope = self._query_heads(q_in, cos, sin, q_in_fp8)
        latent, latent_fp8, k_rope = self._latents(kv, cos, sin, fp8_input_pow2([self.wkv_b]))
        return torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2), *self._key_heads(latent, latent_fp8, k_rope)

    def _key_heads(self, latent: torch.Tensor, latent_fp8: Fp8Pair | None, k_rope: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ``k, v`` (``[B, H, T, d]``) from the normalised latent and the rotated shared key."""
        kv_heads = self.wkv_b(latent, latent_fp8).unflatten(-1, (self.n_heads, -1))
        k_nope, v = kv_heads.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        pad = k.shape[-1] - self.v_dim if k.device.type == "cpu" else 0
        if pad > 0:  # CPU's fused SDPA kernel needs equal q/k and v head dims; zero columns leave o exact
            v = F.pad(v, (0, pad))
        return k, v.transpose(1, 2)

    def _chunk_key_heads(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_key_heads`` of one key chunk under context parallelism from its gathered latent and rotated
        shared key; the latent's FP8 copy, where ``wkv_b`` takes one, quantized here (1x128 tiles along the
        features: the same values as quantizing before the exchange)."""
        pow2 = fp8_input_pow2([self.wkv_b])
        latent_fp8 = None if pow2 is None else act_quant(latent.detach(), pow2=pow2)
        return self._key_heads(latent, latent_fp8, k_rope)

    def _context_parallel_attention(self, q_in: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
                                    sin: torch.Tensor, q_in_fp8: Fp8Pair | None = None) -> torch.Tensor:
        """Attention of the local queries to the whole sequence (``haillm.parallel.context``): the local latents
        and rotated shared keys all-gathered over the cp ranks (in flight while the queries are computed), then
        up-projected one key chunk at a time."""
        latent, _, k_rope = self._latents(kv, cos, sin)
        local = torch.cat([latent, k_rope], dim=-1)
        pending = self.cp.start_gather(local)
        # [B, T, H, d], contiguous: the attention nodes save views of it, which recompute rebuilds from its recipe
        join = self._joined_queries
        q = (recomputable(join, q_in, cos, sin, q_in_fp8) if self.recompute_up_proj else join(q_in, cos, sin, q_in_fp8))
        return self._attend_gathered(q, local, pending)

    @eager_in_compiled_regions  # the wait, and autograd nodes sharing Python state
    def _attend_gathered(self, q: torch.Tensor, local: torch.Tensor, pending: PendingGather) -> torch.Tensor:
        """The blockwise attention of ``q`` to the gathered key chunks, once the gather of ``local`` is done."""
        sizes = (self.kv_lora_rank, self.rope_dim)
        latents, k_ropes = self.cp.finish_gather(pending, sizes)
        if self.recompute_up_proj and torch.is_grad_enabled():  # backward gathers them again: only `local` is kept
            mark_outputs((latents, k_ropes), self.cp.regather, local, sizes)
        chunks = list(zip(latents, k_ropes, strict=True))  # [B, T / 2cp, ...] each, in sequence order
        return self.cp.attention(q.transpose(1, 2), chunks, self._chunk_key_heads, self.softmax_scale)

    def _joined_queries(self, q_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        q_in_fp8: Fp8Pair | None = None) -> torch.Tensor:
        return torch.cat(self._query_heads(q_in, cos, sin, q_in_fp8), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        """Causal self-attention over ``x: [B, T, dim]`` with rope tables at its tokens' positions (``0..T-1``;
        under context parallelism, ``self.cp``, those of this rank's chunks); ``x_fp8``: ``act_quant(x)`` for
        the FP8 linears reading ``x`` (``Linear.forward``)."""
        tp = self.tp
        if self.q_lora_rank == 0:
            latents = (tp.enter(x), tp.enter(self.wkv_a(x, x_fp8)), cos, sin, tp.enter_fp8(x_fp8))
        else:
            latents = (tp.enter(self.wq_a(x, x_fp8)), tp.enter(self.wkv_a(x, x_fp8)), cos, sin)
        if self.cp.enabled:
            o = self._context_parallel_attention(*latents)
        elif self.recompute_up_proj:
            o = precision.attention(*recomputable(self.up_project, *latents), self.softmax_scale)
        else:
            o = precision.attention(*self.up_project(*latents), self.softmax_scale)
        pow2 = fp8_input_pow2([self.wo])
        outputs = _head_outputs(o, self.v_dim, pow2)
        if torch.is_grad_enabled():  # wo keeps a recipe from o, which attention keeps anyway (under recompute)
            mark_outputs(outputs, _head_outputs, source(o), self.v_dim, pow2)
        return tp.exit(self.wo(outputs[0], None if pow2 is None else outputs[1:]))

    def forward_absorbed(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        pe_cache: torch.Tensor,
        start_pos: int,
    ) -> torch.Tensor:
        """Attention for new tokens at positions ``start_pos..start_pos+t-1`` against the latent cache
        (``kv_cache: [B_max, S_max, kv_lora_rank]``, ``pe_cache: [B_max, S_max, rope_dim]``, updated in place)."""
        bsz, t, _ = x.shape
        end = start_pos + t
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, _, k_rope = self._latents(self.wkv_a(x), cos, sin)
        kv_cache[:bsz, start_pos:end] = latent
        pe_cache[:bsz, start_pos:end] = k_rope
        kv, pe = kv_cache[:bsz, :end], pe_cache[:bsz, :end]
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = torch.einsum("bthc,bsc->bhts", q_latent, kv) + torch.einsum("bthr,bsr->bhts", q_rope, pe)
        causal = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(start_pos)
        scores = scores.mul(self.softmax_scale).masked_fill(~causal, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).type_as(x)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, kv)
        return self.wo(torch.einsum("bthc,hdc->bthd", o_latent, w_uv).flatten(2))
