"""Analytic parameter counts and training FLOPs per token (used by the trainer's MFU).

Counts are exactly ``sum(p.numel())`` of the corresponding ``DeepSeekV3`` parameters (buffers such as the gate
bias are not parameters). "Activated" counts what one token touches: every non-expert parameter, the gate,
the shared experts and ``n_activated_experts`` routed experts, but not the embedding table (a token reads one
row of it). This convention reproduces DeepSeek's published figures (V3 36.6B vs "37B"/36.7B, V2 20.9B vs
"21B", V2-Lite 2.45B vs "2.4B"); counting the embedding would give V3 37.55B.
"""

from haillm.models.deepseek_v3.args import ModelArgs


def _attn_params(a: ModelArgs) -> int:
    qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank == 0:
        q = a.dim * a.n_heads * qk_head
    else:
        q = a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.n_heads * qk_head
    kv = a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.n_heads * a.v_head_dim * a.dim


def _moe_params(a: ModelArgs) -> tuple[int, int]:
    expert = 3 * a.dim * a.moe_inter_dim
    fixed = a.n_routed_experts * a.dim + a.n_shared_experts * expert  # gate + shared experts
    return fixed + a.n_routed_experts * expert, fixed + a.n_activated_experts * expert


def block_params(a: ModelArgs, dense: bool) -> tuple[int, int]:
    """(total, activated) parameters of one transformer block: the figures the pipeline balances stages by."""
    base = 2 * a.dim + _attn_params(a)  # attn_norm, ffn_norm, MLA
    if dense:
        ffn = 3 * a.dim * a.inter_dim
        return base + ffn, base + ffn
    total, active = _moe_params(a)
    return base + total, base + active


def count_params(args: ModelArgs) -> tuple[int, int]:
    """(total, activated) parameters of the main model: embedding, blocks, final norm, head; MTP excluded."""
    total = 2 * args.vocab_size * args.dim + args.dim
    active = args.vocab_size * args.dim + args.dim
    for i in range(args.n_layers):
        t, a = block_params(args, dense=i < args.n_dense_layers)
        total, active = total + t, active + a
    return total, active


def mtp_params(args: ModelArgs) -> tuple[int, int]:
    """(total, activated) parameters unique to the MTP modules (embedding and head are shared, not counted)."""
    t, a = block_params(args, dense=False)
    per_module = 3 * args.dim + 2 * args.dim * args.dim  # enorm, hnorm, norm, eh_proj
    return args.mtp_depth * (per_module + t), args.mtp_depth * (per_module + a)


def flops_per_token(args: ModelArgs, seq_len: int, causal: bool = True) -> float:
    """Training (forward + backward) FLOPs per token.

    ``6 * N`` for the matmul weights one token uses, where N = activated parameters of the main model and the
    MTP modules minus the norm weights, plus the head once more per MTP depth (it is applied again); plus
    attention ``6 * n_heads * (qk_head_dim + v_head_dim) * S_eff`` per layer (scores and value products, x3
    for backward), with ``S_eff = seq_len / 2`` when counting causal attention as done (default) and
    ``seq_len`` when counting it as full (the "non-causal" convention). MTP blocks count as attention layers
    too. Routing, softmax and elementwise work are not counted.

    V3 at 4096 tokens: 260.6 GFLOPs (250.4 without MTP, matching ISCA'25's 250; 281.2 non-causal).
    """
    a = args
    block_norms = 2 * a.dim + a.kv_lora_rank + a.q_lora_rank  # attn/ffn norms, kv_norm, q_norm (if any)
    main_matmul = count_params(a)[1] - a.dim - a.n_layers * block_norms
    mtp_matmul = mtp_params(a)[1] - a.mtp_depth * (3 * a.dim + block_norms) + a.mtp_depth * a.vocab_size * a.dim
    matmul = main_matmul + mtp_matmul
    s_eff = seq_len / 2 if causal else seq_len
    attn = 6 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * s_eff
    return 6.0 * matmul + attn * (a.n_layers + a.mtp_depth)
