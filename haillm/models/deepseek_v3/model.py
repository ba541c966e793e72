"""The DeepSeek-V3 transformer: embedding, pre-norm blocks (MLA + dense FFN or MoE), final norm, head, and
the MTP modules; the training objective (``compute_loss``) and the latent-cache inference path."""

import contextlib
import hashlib
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from haillm.fp8.fused import normed
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.models.deepseek_v3.balance import take_balance_loss
from haillm.models.deepseek_v3.experts import GroupedExperts
from haillm.models.deepseek_v3.mla import MLA, rope_tables
from haillm.models.deepseek_v3.moe import MLP, Gate, GraphCut, MoE
from haillm.models.deepseek_v3.mtp import MTPModule
from haillm.ops import Linear, RMSNorm
from haillm.ops.recompute import keeping_recipes, mark
from haillm.parallel.context import NO_CP
from haillm.parallel.tensor import NO_TP


class Block(nn.Module):
    """``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``; ffn is dense for the first n_dense_layers.
    Where the attention's or the FFN's input linears run in FP8, the norm quantizes its output for them."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self._attention(x, cos, sin)
        h, h_fp8 = normed(self.ffn_norm, x, self.ffn.fp8_input_pow2)
        return x + self.ffn(h, h_fp8)

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h, h_fp8 = normed(self.attn_norm, x, self.attn.fp8_input_pow2)
        return x + self.attn(h, cos, sin, h_fp8)

    @property
    def exchanges_tokens(self) -> bool:
        """True when the FFN is an MoE layer whose tokens go to other ranks (``forward_phases`` yields)."""
        return isinstance(self.ffn, MoE) and self.ffn.exchanges_tokens

    def forward_phases(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cut: GraphCut | None
                       ) -> Generator[None, None, torch.Tensor]:
        """``forward`` as a generator yielding while an MoE layer's tokens are in flight (``MoE.forward_phases``;
        for the pipeline's overlapped F&B pairs). Without ``cut`` or token exchanges it never yields."""
        if cut is None or not self.exchanges_tokens:
            return self.forward(x, cos, sin)
        x = self._attention(x, cos, sin)
        h, h_fp8 = normed(self.ffn_norm, x, self.ffn.fp8_input_pow2)
        (x,) = cut(x)  # the residual is used again after the combine
        return x + (yield from self.ffn.forward_phases(h, cut, h_fp8))

    def forward_inference(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, start_pos: int
    ) -> torch.Tensor:
        x = x + self.attn.forward_absorbed(self.attn_norm(x), cos, sin, kv, pe, start_pos)
        return x + self.ffn(self.ffn_norm(x))


@dataclass
class InferenceCache:
    """Per layer and token only ``kv_lora_rank + qk_rope_head_dim`` values: ``kv: [L, B, S, kv_lora_rank]``
    (normalised latent) and ``pe: [L, B, S, qk_rope_head_dim]`` (rotated shared key)."""

    kv: torch.Tensor
    pe: torch.Tensor


def param_seed(seed: int, fqn: str) -> int:
    """Stable 63-bit seed for one parameter, a function of (seed, FQN) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{fqn}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, std: float, prefix: str = "",
                 blocks: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Initialise every parameter of ``module`` from its own generator seeded by ``(seed, prefix + name)``:
    norms to ones, biases and gate balancing biases to zeros, all other weights ~ N(0, std).

    Because no random state is shared between parameters, a pipeline stage or expert-parallel shard that
    holds a subset of the parameters (under their full-model FQNs, via ``prefix``) gets bitwise the values
    the full model would have, whatever the construction order. Stacked routed experts are seeded row by
    row under their per-expert names (``...experts.<gid>.w1.weight``), so any expert layout agrees too.

    The numbers are drawn where the parameter lives: a 1.4B-parameter model is ~8 s of serial sampling on
    the CPU and a fraction of a second on a GPU. CPU and CUDA generators differ, so the same seed gives other
    (equally distributed) weights on a GPU than on the CPU; all layouts on one kind of device agree bitwise.
    """
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        params = mod.named_expert_weights() if isinstance(mod, GroupedExperts) else mod.named_parameters(recurse=False)
        for name, p in params:
            if isinstance(mod, RMSNorm):
                p.fill_(1.0)
            elif name == "bias":
                p.zero_()
            else:
                fqn = f"{mod_name}.{name}" if mod_name else name
                gen = torch.Generator(p.device).manual_seed(param_seed(seed, fqn))
                dim, rank, size = (blocks or {}).get(fqn, (0, 0, 1))
                whole = [n * size if d == dim else n for d, n in enumerate(p.shape)]
                drawn = torch.empty(whole, dtype=torch.float32, device=p.device).normal_(0.0, std, generator=gen)
                p.copy_(drawn.chunk(size, dim)[rank])
        if isinstance(mod, Gate):
            mod.bias.zero_()
        if isinstance(mod, MoE):
            mod.tokens_per_expert.zero_()


def moe_layers_of(blocks: list[Block]) -> list[MoE]:
    """The FFNs of ``blocks`` that are MoE layers, in order."""
    return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]


def _mark_norm_output(norm: RMSNorm, args: tuple, out: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        mark(out, norm, *args)


class TrainingObjective:
    """What the full model and a pipeline stage (``haillm.parallel.pipeline.stage``) share: the main and MTP
    losses from the last hidden state, the expert-load bookkeeping and activation recomputation. Needs
    ``args``, ``embed``, ``norm``, ``head``, ``mtp``, the ``rope_cos``/``rope_sin`` tables and
    ``moe_layers()``; is an ``nn.Module``."""

    recompute = False  # saved marked tensors become recipes (either kind of recompute is on)
    recompute_swiglu = False
    # tensor parallelism (haillm.parallel.tensor_plan): under sequence parallelism the hidden states between
    # the blocks are sequence shards, and the MTP modules, one token shorter, take them whole
    tp = NO_TP
    # context parallelism (haillm.parallel.context.apply_context_parallel): the hidden states hold this rank's
    # chunks of each sequence; the batches stay whole (token ids are cheap) and each rank takes its chunks
    cp = NO_CP

    def rope_at(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope tables at the positions of the tokens this rank's attention takes, of ``seq_len``-token
        sequences: ``0..seq_len-1``, or under context parallelism this rank's chunks."""
        if seq_len > self.args.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.args.max_seq_len}")
        if not self.cp.enabled:
            return self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        where = self.cp.positions(seq_len, self.rope_cos.device)
        return self.rope_cos[where], self.rope_sin[where]

    def set_recompute(self, enabled: bool, swiglu: bool = False) -> None:
        """``enabled``: keep no RMSNorm outputs (nor their FP8 copies), no MLA up-projections (q, k, v) and no
        second copy of the attention output (``wo``'s input) for backward: recompute them from the norms'
        inputs, the latents and the attention output (report §3.2.3; ``haillm.ops.recompute``). Gradients
        are bitwise unchanged.

        ``swiglu``: the FFNs keep only their SwiGLU inputs (FP8 where ``w2`` is FP8) and recompute its output;
        MoE layers apply the gate weights before ``w2`` so that the combine keeps nothing (report §3.3.2;
        ``MoE.gate_weights_inside``). Equal in exact arithmetic, not bitwise: tests/test_moe_memory.py."""
        for handle in getattr(self, "_norm_hooks", []):
            handle.remove()
        self._norm_hooks = []
        for m in self.modules():
            if isinstance(m, MLA):
                m.recompute_up_proj = enabled
            if enabled and isinstance(m, RMSNorm):
                self._norm_hooks.append(m.register_forward_hook(_mark_norm_output))
            if isinstance(m, MLP):
                m.keep_swiglu_inputs = swiglu
            if isinstance(m, MoE):
                m.gate_weights_inside = swiglu
        self.recompute, self.recompute_swiglu = enabled or swiglu, swiglu

    def _saving(self) -> contextlib.AbstractContextManager:
        """Enter around each piece of a training forward: saved marked tensors become recipes."""
        return keeping_recipes() if self.recompute else contextlib.nullcontext()

    def lm_and_mtp_losses(self, h: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                          emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``lm_loss`` and the weighted ``mtp_loss`` of ``compute_loss`` from the main model's last hidden
        state ``h`` (``emb``: the input embeddings, looked up here when not given)."""
        try:
            next(self.lm_and_mtp_loss_phases(h, inputs, targets, emb))
        except StopIteration as done:
            return done.value
        raise AssertionError("loss phases without a graph cut never yield")

    def lm_and_mtp_loss_phases(self, h: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                               emb: torch.Tensor | None = None, cut: GraphCut | None = None
                               ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """``lm_and_mtp_losses`` as a generator yielding while the MTP blocks' tokens are in flight
        (``Block.forward_phases``), for a pipeline's overlapped F&B pairs. ``inputs`` and ``targets`` are
        whole sequences; under context parallelism ``h`` and ``emb`` hold this rank's chunks."""
        if self.cp.enabled:
            return (yield from self._context_parallel_loss_phases(h, inputs, targets, cut))
        n_positions = targets.numel()
        lm_loss = self.head.cross_entropy_sum(self.norm(h), targets) / n_positions
        mtp_loss = lm_loss.new_zeros(())
        if not self.args.mtp_depth:
            return lm_loss, mtp_loss
        emb = self.tp.gather_sequence(self.embed(inputs) if emb is None else emb)
        h, seq_len = self.tp.gather_sequence(h), inputs.shape[1]
        for k, mtp in enumerate(self.mtp.values(), start=1):
            cos, sin = self.rope_cos[: seq_len - k], self.rope_sin[: seq_len - k]
            x = mtp.project(h[:, :-1], emb[:, k:])
            if cut is not None and mtp.block.exchanges_tokens:
                lm_loss, mtp_loss, emb = cut(lm_loss, mtp_loss, emb)  # used again after the block's exchanges
            h = yield from mtp.block.forward_phases(x, cos, sin, cut)
            mtp_loss = mtp_loss + self.head.cross_entropy_sum(mtp.norm(h), targets[:, k:]) / n_positions
        return lm_loss, mtp_loss * (self.args.mtp_lambda / self.args.mtp_depth)

    def _context_parallel_loss_phases(self, h: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                                      cut: GraphCut | None) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """The losses of this rank's chunks, each a mean over its own positions (the cp ranks' gradients are
        averaged). The MTP chain keeps every depth at the main model's positions: depth k combines ``h^{k-1}``
        at position t with the embedding of token t + k (token ids are whole on every rank, so nothing crosses
        ranks) and predicts target t + k; the last k positions of the sequence have none and are left out of
        the loss and, through ``MoE.tail``, of the routing statistics. Causal attention keeps them out of the
        other positions."""
        cp, seq_len = self.cp, inputs.shape[1]
        local_targets = cp.local(targets)
        n_positions = local_targets.numel()
        lm_loss = self.head.cross_entropy_sum(self.norm(h), local_targets) / n_positions
        mtp_loss = lm_loss.new_zeros(())
        if not self.args.mtp_depth:
            return lm_loss, mtp_loss
        cos, sin = self.rope_at(seq_len)
        h = self.tp.gather_sequence(h)  # the MTP modules take their tokens whole over tp (replicated mode)
        for k, mtp in enumerate(self.mtp.values(), start=1):
            x = mtp.project(h, self.tp.gather_sequence(self.embed(cp.local(F.pad(inputs[:, k:], (0, k))))))
            if cut is not None and mtp.block.exchanges_tokens:
                lm_loss, mtp_loss = cut(lm_loss, mtp_loss)  # used again after the block's exchanges
            h = yield from mtp.block.forward_phases(x, cos, sin, cut)
            valid = h.shape[1] - (k if cp.holds_end else 0)
            shifted = cp.local(F.pad(targets[:, k:], (0, k)))[:, :valid]
            mtp_loss = mtp_loss + self.head.cross_entropy_sum(mtp.norm(h)[:, :valid], shifted) / n_positions
        return lm_loss, mtp_loss * (self.args.mtp_lambda / self.args.mtp_depth)

    def init_weights(self, seed: int) -> None:
        """Deterministic from ``seed`` alone, per parameter FQN (see module-level ``init_weights``), so a
        pipeline stage or expert shard gets the full model's values; also ``rebuild_unsaved()``."""
        placements = getattr(self, "tp_placements", {})
        blocks = {name: (pl.shard_dim, self.tp.rank, self.tp.size) for name, pl in placements.items()
                  if pl.shard_dim is not None}
        init_weights(self, seed, self.args.init_std, blocks=blocks)
        self.rebuild_unsaved()

    def rebuild_unsaved(self) -> None:
        """Fill the buffers no checkpoint holds (the rope tables, the expert-load counters): after ``to_empty``
        from the meta device they hold whatever the allocator gave, so a model loaded from a checkpoint needs
        this before its first forward."""
        cos, sin = rope_tables(self.args, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.reset_moe_loads()

    def moe_layers(self) -> list[MoE]:
        """The MoE layers held here in a fixed order: main-model layers by index, then the MTP blocks."""
        return moe_layers_of(list(self.layers.values()) + [m.block for m in getattr(self, "mtp", {}).values()])

    def moe_loads(self) -> torch.Tensor:
        """``[n_moe_layers, n_routed_experts]`` tokens routed per expert since the last reset, in
        ``moe_layers()`` order (``[0, n_routed]`` for a module without MoE layers)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, max(self.args.n_routed_experts, 1))
        return torch.stack([m.tokens_per_expert for m in layers])

    def reset_moe_loads(self) -> None:
        for m in self.moe_layers():
            m.tokens_per_expert.zero_()

    def update_gate_bias(self, loads: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free bias step for every MoE layer from ``loads`` as ``moe_loads()`` returns them, reduced
        over every rank that saw part of the step's data (data parallel, and the DualPipe mirror rank)."""
        if gamma == 0:
            return
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.update_bias(load, gamma)


class DeepSeekV3(TrainingObjective, nn.Module):
    """DeepSeek-V3 for training. ``model(tokens)`` gives main-head logits; ``compute_loss(batch)`` the full
    objective. Built with ``init_seed=None`` (or on the meta device) it skips initialisation; otherwise it
    calls ``init_weights(init_seed)``."""

    def __init__(self, args: ModelArgs, init_seed: int | None = 0) -> None:
        super().__init__()
        self.args = args.validate()
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.head = Linear(args.dim, args.vocab_size)
        self.mtp = nn.ModuleDict(
            {str(k): MTPModule(args, Block(args, args.n_layers + k)) for k in range(args.mtp_depth)}
        )
        cos, sin = rope_tables(args, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init_seed is not None and self.embed.weight.device.type != "meta":
            self.init_weights(init_seed)

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.args.max_seq_len:
            raise ValueError(f"sequence end {start + length} exceeds model.max_seq_len={self.args.max_seq_len}")
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def hidden(self, emb: torch.Tensor) -> torch.Tensor:
        """Main-model blocks on embeddings ``[B, T, dim]``; the last hidden state before the final norm (this is
        also ``h^0`` of the MTP chain)."""
        cos, sin = self.rope_at(emb.shape[1] * self.tp.seq_factor * self.cp.size)
        h = emb
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens: [B, T]`` -> main-head logits ``[B, T, vocab]``."""
        return self.head(self.norm(self.hidden(self.embed(tokens))))

    def compute_loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective on ``batch: [B, T+1]`` (inputs ``batch[:, :-1]``, targets ``batch[:, 1:]``).

        - ``lm_loss``: next-token cross-entropy, mean over the B*T positions.
        - ``mtp_loss`` = ``mtp_lambda / D * sum_k L_k``, where depth k predicts ``targets[:, k:]`` from
          ``h^{k-1}[:, :T-k]`` and ``Emb(inputs[:, k:])`` and ``L_k`` sums its CE over the B*(T-k) valid
          positions and divides by B*T (report §2.2).
        - ``balance_loss``: sum over all MoE layers (MTP blocks included) of the sequence-wise balance loss,
          exactly 0 (and not computed) when ``balance_alpha == 0``.
        - ``loss`` = lm + mtp + balance, the tensor to backpropagate; the other three are detached.
        """
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with self._saving():
            emb = self.embed(self.cp.local(inputs))
            lm_loss, mtp_loss = self.lm_and_mtp_losses(self.hidden(emb), inputs, targets, emb)
        balance_loss = take_balance_loss(self.moe_layers(), lm_loss)
        loss = lm_loss + mtp_loss + balance_loss
        return {
            "loss": loss,
            "lm_loss": lm_loss.detach(),
            "mtp_loss": mtp_loss.detach(),
            "balance_loss": balance_loss.detach(),
        }

    # --- expert load balancing -------------------------------------------------------------------------

    # --- inference with the latent cache -------------------------------------------------------------

    def new_inference_cache(self, batch_size: int, max_len: int | None = None) -> InferenceCache:
        a, device = self.args, self.embed.weight.device
        max_len = max_len or a.max_seq_len
        shape = (a.n_layers, batch_size, max_len)
        return InferenceCache(
            kv=torch.zeros(*shape, a.kv_lora_rank, device=device, dtype=self.embed.weight.dtype),
            pe=torch.zeros(*shape, a.qk_rope_head_dim, device=device, dtype=self.embed.weight.dtype),
        )

    @torch.no_grad()
    def forward_inference(self, tokens: torch.Tensor, start_pos: int, cache: InferenceCache) -> torch.Tensor:
        """Main-head logits ``[B, t, vocab]`` for ``tokens: [B, t]`` at positions ``start_pos..start_pos+t-1``,
        attending to everything cached before; absorbed MLA, caches updated in place."""
        cos, sin = self._rope(start_pos, tokens.shape[1])
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers.values()):
            h = layer.forward_inference(h, cos, sin, cache.kv[i], cache.pe[i], start_pos)
        return self.head(self.norm(h))
