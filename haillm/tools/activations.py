"""What one micro-batch's forward keeps for backward, modelled from the DeepSeek-V3 layer structure.

Every term is a tensor that an op of ``haillm.models.deepseek_v3`` saves for its backward, per token of a
micro-batch unless marked per sequence: RMSNorm keeps its input and an fp32 ``rstd``; a linear keeps its
input (an FP8 linear an FP8 copy and 1x128 scales instead: its own, or one shared by all the FP8 linears
reading a norm's output, which the norm quantizes once, ``haillm.fp8.fused``); RoPE keeps its rotation table;
attention keeps q, k, v, its output and an fp32 log-sum-exp per head; SwiGLU keeps three intermediates, or
only its two inputs where it quantizes for an FP8 down projection (the fused op recomputes silu); the router
keeps fp32 scores, the chosen indices and weights; every routed copy of a token (top-k of them) keeps its
input, intermediates, output and weighted output (``index_add`` keeps its source); the fused head +
cross-entropy keeps nothing vocabulary-wide per token: its input and two fp32 numbers per token (it
recomputes the logits in backward), or where the vocabulary and dim are small for the tokens the gradients it
computed in forward (``head_bytes``). A tensor saved by several ops counts once. With
``train.recompute`` the RMSNorm outputs and the attention's q, k, v are recomputed in backward, so they
are not kept. Parameters are never counted here.

The CPU specifics follow the code: CPU attention pads v to the q/k head dim, and keeps its output in fp32
(a BF16 run's attention is the fp32 kernel on the bf16 q, k, v, ``haillm.ops.precision``).

Tensor parallelism (``tp``, ``haillm.parallel.tensor_plan``): the per-token figures are per token of the whole
sequence, on one tp rank. Attention keeps its heads' share (``n_heads / tp``) and the FFNs their share of the
hidden width; the router and the routed experts keep each rank's rows (``1 / tp`` of the tokens). Under sequence
parallelism the norms, the residual stream and the router's input are a sequence shard (``1 / tp``), while what
enters a region is gathered into a new whole-sequence tensor: the MLA latents, the FFN's and the shared experts'
input (kept by the column-parallel ``w1``/``w3`` even with recompute: it is no norm output), the head's input.
The vocabulary-parallel embedding keeps its masked local ids and mask, the head its local targets and mask, and
the MTP modules (replicated mode, whole sequences) the gathered embedding and last hidden state.

Context parallelism (``cp``, ``haillm.parallel.context``): a rank holds ``1 / cp`` of every sequence's tokens,
and the per-token figures are per local token. Its attention keeps no per-head keys and values (each key
chunk's are recomputed from the latents in backward) and not its local normalised latent (no linear reads it:
``wkv_b`` reads the gathered chunks); it keeps the whole sequence's gathered latents and rotated shared keys,
``cp`` times the local ones, or with recompute only the local ones (backward gathers them again), and where
``wkv_b`` is FP8 the FP8 copy of every gathered chunk it quantizes. The MTP modules keep the main model's
positions (their last k positions are none) and embed their shifted tokens anew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from haillm.fp8.policy import BLOCK as FP8_BLOCK
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.ops.linear import CE_BLOCK_BYTES, CE_BLOCK_BYTES_GPU, ce_grads_in_forward
from haillm.parallel.pipeline.stage import StageSpec

FP32, INT64 = 4, 8


@dataclass(frozen=True)
class ActivationSetup:
    """What changes what is kept: activation dtype size, recomputation, FP8 linears, the device (CPU code
    paths), expert and tensor parallelism."""

    act_bytes: int
    recompute: bool = False
    fp8: bool = False
    cpu: bool = False
    ep: int = 1
    swiglu: bool | None = None  # train.recompute_swiglu: None follows recompute
    tp: int = 1
    sequence_parallel: bool = False  # parallel.sequence_parallel (with tp > 1)
    cp: int = 1

    @property
    def swiglu_inputs_only(self) -> bool:
        """FFNs keep only their SwiGLU inputs, and MoE layers apply the gate weights before ``w2``."""
        return self.recompute if self.swiglu is None else self.swiglu

    @property
    def gathers(self) -> bool:
        """Entering a tensor-parallel region all-gathers the sequence into a new tensor (sequence parallelism);
        otherwise the region reads the tensor itself."""
        return self.tp > 1 and self.sequence_parallel

    @property
    def shard(self) -> float:
        """The share of the sequence between the regions: the norms, the residual stream."""
        return 1 / self.tp if self.gathers else 1

    def replicated(self) -> ActivationSetup:
        """The MTP modules' setup: replicated mode under sequence parallelism too."""
        return replace(self, sequence_parallel=False)


def _kept(features: int, s: ActivationSetup, hp_savers: bool, fp8_linears: list[tuple[int, int]],
          marked: bool = False) -> float:
    """Bytes per token of a ``features``-wide activation: once in its own dtype if any high-precision op
    saves it, plus, read by FP8 linears, the one FP8 copy they share (its producer quantizes it once for all of
    them, ``haillm.fp8.fused``); nothing where it is ``marked`` for recomputation (a norm's output and its FP8
    copy, ``wo``'s input) and recompute is on."""
    if marked and s.recompute:
        return 0
    n_fp8 = len(fp8_linears) if s.fp8 else 0
    fp8_copies = min(n_fp8, 1)
    hp = hp_savers or n_fp8 < len(fp8_linears)
    return (features * s.act_bytes if hp else 0) + fp8_copies * fp8_bytes(features)


def fp8_bytes(features: int) -> int:
    """An FP8 copy with its 1x128-tile fp32 scales."""
    return features + FP32 * math.ceil(features / FP8_BLOCK)


def _swiglu(dim: int, inter: int, s: ActivationSetup) -> float:
    """A SwiGLU MLP without its input: silu's input, silu's output and w3's output (the product's operands),
    and w2's input. With FP8 the SwiGLU quantizes for w2 and keeps only w1's and w3's outputs. Keeping only
    the SwiGLU inputs (``swiglu_inputs_only``): w1's and w3's outputs, FP8 where w2 is, nothing else."""
    if s.swiglu_inputs_only:
        return 2 * (fp8_bytes(inter) if s.fp8 else inter * s.act_bytes)
    intermediates = 2 if s.fp8 else 3
    return intermediates * inter * s.act_bytes + _kept(inter, s, False, [(inter, dim)])


def attention_per_token(a: ModelArgs, s: ActivationSetup) -> float:
    """MLA with its pre-norm, per token (the rotation tables are per sequence: ``rope_per_sequence``). The
    down-projections read the norm's output where it is (a shard under sequence parallelism); ``wq`` (no
    q-LoRA) is column-parallel and reads it entered, gathered. The latents enter the region whole."""
    act, heads, qk = s.act_bytes, a.n_heads // s.tp, a.qk_nope_head_dim + a.qk_rope_head_dim
    q_out, kv_a = heads * qk, (a.dim, a.kv_lora_rank + a.qk_rope_head_dim)
    out = s.shard * (a.dim * act + FP32)  # attn_norm: block input, rstd
    if a.q_lora_rank:
        out += s.shard * _kept(a.dim, s, False, [(a.dim, a.q_lora_rank), kv_a], marked=True)
        out += a.q_lora_rank * act + FP32  # q_norm: input, rstd
        out += _kept(a.q_lora_rank, s, False, [(a.q_lora_rank, q_out)], marked=True)
    elif s.gathers:  # wkv_a on the shard, wq on the gathered input (a new tensor: never recomputed)
        out += s.shard * _kept(a.dim, s, False, [kv_a], marked=True) + _kept(a.dim, s, False, [(a.dim, q_out)])
    else:
        out += _kept(a.dim, s, False, [(a.dim, q_out), kv_a], marked=True)
    out += (a.kv_lora_rank + a.qk_rope_head_dim) * act + FP32  # wkv_a output (kv_norm and k-rope input), rstd
    if s.cp > 1:  # wkv_b reads the gathered chunks, not the local normalised latent
        out += (a.kv_lora_rank + a.qk_rope_head_dim) * act * (1 if s.recompute else s.cp)  # local, or gathered
        out += s.cp * fp8_bytes(a.kv_lora_rank) if s.fp8 else 0  # wkv_b's FP8 copies of the gathered chunks
        if not s.recompute:
            out += q_out * act  # q; each key chunk's k and v are recomputed in backward
    else:
        out += _kept(a.kv_lora_rank, s, False, [(a.kv_lora_rank, heads * (a.qk_nope_head_dim + a.v_head_dim))],
                     marked=True)  # the normalised latent wkv_b reads
        if not s.recompute:
            v_kept = heads * qk if s.cpu else heads * (a.qk_nope_head_dim + a.v_head_dim)  # CPU pads v
            out += (2 * q_out + v_kept) * act  # q, k, v
    out += heads * (qk * FP32 if s.cpu else a.v_head_dim * act) + heads * FP32  # attention output, log-sum-exp
    if heads > 1 or s.fp8:  # wo's input (one head: a view of the attention output, kept above)
        out += _kept(heads * a.v_head_dim, s, False, [(heads * a.v_head_dim, a.dim)], marked=True)
    return out


def rope_per_sequence(a: ModelArgs, seq_len: int) -> float:
    """The complex rotation tables q's and k's RoPE keep, ``[seq_len, rope_dim/2]`` complex64 each."""
    return 2 * seq_len * a.qk_rope_head_dim // 2 * 8


def ffn_per_token(a: ModelArgs, dense: bool, s: ActivationSetup) -> float:
    """The FFN half of a block with its pre-norm, per token: dense SwiGLU, or the MoE layer (router,
    shared experts, and ``n_activated_experts`` routed copies of every token, routed by one tp rank each)."""
    act, dim, k, tp = s.act_bytes, a.dim, a.n_activated_experts, s.tp
    out = s.shard * (dim * act + FP32)  # ffn_norm: residual, rstd
    # the column-parallel w1/w3 read the norm output entered: itself, or gathered (a new tensor, never recomputed)
    if dense:
        ffn_in = _kept(dim, s, False, [(dim, a.inter_dim // tp)] * 2, marked=not s.gathers)
        return out + ffn_in + _swiglu(dim, a.inter_dim // tp, s)
    shared = a.n_shared_experts * a.moe_inter_dim // tp
    shared_linears = [(dim, shared)] * 2 if shared else []
    # the router keeps the norm output itself (its rows of it, a view in replicated mode; up-cast in backward)
    if s.gathers:
        out += s.shard * _kept(dim, s, True, [], marked=True) + _kept(dim, s, False, shared_linears)
    else:
        out += _kept(dim, s, True, shared_linears, marked=True)
    routed = a.n_routed_experts * FP32 + k * INT64  # router scores, chosen indices
    if a.norm_topk_prob:
        routed += k * FP32 + FP32  # weights and their sum
    if a.balance_alpha > 0:  # the sequence-wise balance loss: score sums, and where the rows are split, their ids
        routed += FP32 + (INT64 if tp > 1 and not s.gathers else 0)
    routed += 2 * k * INT64  # copies' source tokens and positions
    if s.ep > 1:
        routed += 2 * k * INT64  # received copies' order and its inverse
    copy = _kept(dim, s, False, [(dim, a.moe_inter_dim)] * 2) + _swiglu(dim, a.moe_inter_dim, s)
    if s.swiglu_inputs_only:
        routed += k * (copy + FP32)  # each routed copy: input, SwiGLU inputs, gate weight (the combine keeps none)
    else:  # input, SwiGLU, gate weight, output and weighted output (the combine's multiply and index_add)
        routed += k * (copy + act + 2 * dim * act)
    out += routed / tp  # each tp rank routes its rows
    if shared:
        out += _swiglu(dim, shared, s)
    return out


def block_bytes(a: ModelArgs, dense: bool, micro_batch: int, seq_len: int, s: ActivationSetup) -> float:
    """One transformer block (dense or MoE) on a micro-batch of ``micro_batch`` sequences of ``seq_len`` (this
    rank's ``1 / cp`` of their tokens)."""
    local = seq_len // s.cp
    tokens = micro_batch * local
    out = tokens * (attention_per_token(a, s) + ffn_per_token(a, dense, s)) + rope_per_sequence(a, local)
    if not dense:
        if a.balance_alpha > 0:
            out += micro_batch * a.n_routed_experts * FP32  # the balance loss's per-sequence expert fractions
    return out


def head_bytes(a: ModelArgs, s: ActivationSetup, tokens: int) -> float:
    """Final norm (input, rstd) and the fused head + cross-entropy (``LinearCrossEntropySum``) on ``tokens``
    tokens. Nothing vocabulary-wide per token, in either of the head's ways (``ce_grads_in_forward``): it
    recomputes the logits and keeps the norm's output (its GEMM input) and two fp32 numbers per token
    (DeepSeek-V3 in BF16: 14,344 bytes per token, where the exponentiated logits kept before took 517,124
    more), or it computes its gradients in forward and keeps the input gradient (the norm output's size) and
    the fp32 weight gradient, at most ``CE_WGRAD_BYTES_PER_TOKEN`` per token. Vocabulary-parallel (tp > 1):
    this rank's classes, on the whole sequence (gathered under sequence parallelism: a new tensor), and the
    local targets with their one-of-ours mask."""
    norm = s.shard * tokens * (a.dim * s.act_bytes + FP32)
    vocab = a.vocab_size // s.tp
    if ce_grads_in_forward(vocab, a.dim, tokens):
        return norm + tokens * a.dim * s.act_bytes + vocab * a.dim * FP32
    kept = a.dim * s.act_bytes if s.gathers else _kept(a.dim, s, True, [], marked=True)
    if s.tp == 1:
        return norm + tokens * (kept + 2 * FP32)  # the logits' max and sum of exponentials
    rows = max(64, (CE_BLOCK_BYTES if s.cpu else CE_BLOCK_BYTES_GPU) // (4 * vocab))  # ops.linear's row blocks
    sums = 2 if tokens <= rows else 1  # one block's sum is a view of the all-reduced (sum, target logit) pair
    return norm + tokens * (kept + (1 + sums + 1) * FP32 + INT64)  # max, sum, mask; local targets


def chunk_bytes(a: ModelArgs, spec: StageSpec, micro_batch: int, seq_len: int, s: ActivationSetup,
                shared_embedding: bool) -> float:
    """Bytes one pipeline stage keeps for backward per micro-batch. ``shared_embedding``: the MTP modules
    reuse the main model's embedding output (the unsplit model); a pipeline's last stage embeds again."""
    if s.cp > 1:
        return _context_parallel_chunk_bytes(a, spec, micro_batch, seq_len, s)
    tokens = micro_batch * seq_len
    out = 0.0
    if s.tp == 1 and (spec.first or spec.last):
        out += micro_batch * (seq_len + 1) * INT64  # the micro-batch's token ids (embedding, targets)
    elif s.tp > 1 and (spec.first or (spec.last and a.mtp_depth > 0)):
        out += tokens * (INT64 + 1)  # the vocabulary-parallel embedding's local ids and outside-mask
    for i in spec.layers:
        out += block_bytes(a, i < a.n_dense_layers, micro_batch, seq_len, s)
    if not spec.last:
        return out
    out += head_bytes(a, s, tokens)
    mtp = s.replicated()
    for k in range(1, a.mtp_depth + 1):
        t_k = micro_batch * (seq_len - k)
        if k == 1:  # enorm's input where no block keeps it (embedded again, or gathered); hnorm's where gathered
            out += tokens * a.dim * s.act_bytes * ((not shared_embedding or s.gathers) + s.gathers)
        # enorm and hnorm rstd, then eh_proj's input (the concatenated normed embedding and hidden state)
        out += t_k * (2 * FP32 + _kept(2 * a.dim, mtp, False, [(2 * a.dim, a.dim)]))
        out += block_bytes(a, False, micro_batch, seq_len - k, mtp)
        out += head_bytes(a, mtp, t_k)
    return out


def _context_parallel_chunk_bytes(a: ModelArgs, spec: StageSpec, micro_batch: int, seq_len: int,
                                  s: ActivationSetup) -> float:
    """``chunk_bytes`` under context parallelism, on the rank that holds the sequences' ends (the most: its MTP
    heads read a copy of their valid rows). Each rank keeps its own copies of its chunks' token ids (the
    embedding's) and targets (the head's), and every MTP depth embeds its shifted ids anew."""
    local = seq_len // s.cp
    tokens = micro_batch * local
    out = tokens * INT64 * (spec.first + spec.last)  # this rank's ids (embedding) and targets (head)
    for i in spec.layers:
        out += block_bytes(a, i < a.n_dense_layers, micro_batch, seq_len, s)
    if not spec.last:
        return out
    out += head_bytes(a, s, tokens)
    for k in range(1, a.mtp_depth + 1):
        valid = micro_batch * (local - k)
        out += tokens * (2 * INT64 + a.dim * s.act_bytes)  # shifted ids and targets; their embedding (enorm's input)
        out += tokens * (2 * FP32 + _kept(2 * a.dim, s, False, [(2 * a.dim, a.dim)]))  # rstds, eh_proj's input
        out += block_bytes(a, False, micro_batch, seq_len, s)
        out += tokens * (a.dim * s.act_bytes + FP32)  # mtp.norm on every row: input, rstd
        if ce_grads_in_forward(a.vocab_size, a.dim, valid):  # the head on a copy of the valid rows (a slice)
            out += valid * a.dim * s.act_bytes + a.vocab_size * a.dim * FP32
        else:
            out += valid * (a.dim * s.act_bytes + 2 * FP32)
    return out
