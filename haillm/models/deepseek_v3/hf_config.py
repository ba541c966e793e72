"""Hugging Face DeepseekV3 ``config.json`` to and from ``ModelArgs`` (used by ``hf.py``'s load and save).

The mapping is field by field; a config whose model we would compute differently (another top-k method,
a rope type other than default or YaRN, tied embeddings, ...) is refused with a ValueError naming the field.
"""

import torch

from haillm.models.deepseek_v3.args import ModelArgs

# ModelArgs fields a checkpoint fixes (shapes, routing, norms, RoPE base). Context length and YaRN, MTP depth
# and the training-objective fields may differ, e.g. to fine-tune at a longer context.
CHECKPOINT_FIELDS = (
    "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
    "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
    "score_func", "route_scale", "norm_topk_prob", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "rope_theta", "rms_norm_eps",
)
# ModelArgs fields a config.json does not hold (training objective and initialisation): `args_from_hf_config`
# leaves them at their defaults, and `model.init_from` keeps the run's.
TRAINING_FIELDS = ("mtp_lambda", "balance_alpha", "bias_update_speed", "init_std")


def args_from_hf_config(config: dict) -> ModelArgs:
    """ModelArgs of a Hugging Face DeepseekV3 config.json; ValueError for what we would compute differently.

    Accepts both the released layout (``rope_theta`` + ``rope_scaling``) and transformers 5's
    (``rope_parameters``). Training-only fields (MTP lambda, balancing, init std) keep their defaults.
    """

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"unsupported DeepseekV3 config: {what}")

    require(config.get("model_type", "deepseek_v3") == "deepseek_v3",
            f"model_type={config.get('model_type')!r} (expected 'deepseek_v3')")
    require(config.get("hidden_act", "silu") == "silu", f"hidden_act={config.get('hidden_act')!r}")
    require(not config.get("attention_bias", False), "attention_bias=true")
    require(not config.get("tie_word_embeddings", False), "tie_word_embeddings=true")
    require(config.get("rope_interleave", True), "rope_interleave=false (we rotate interleaved pairs)")
    require(config.get("topk_method", "noaux_tc") == "noaux_tc",
            f"topk_method={config.get('topk_method')!r} (only 'noaux_tc')")
    require(config.get("scoring_func", "sigmoid") in ("sigmoid", "softmax"),
            f"scoring_func={config.get('scoring_func')!r} (sigmoid or softmax)")
    require(config.get("moe_layer_freq", 1) == 1, f"moe_layer_freq={config.get('moe_layer_freq')}")
    n_heads = config["num_attention_heads"]
    require(config.get("num_key_value_heads") in (None, n_heads),
            f"num_key_value_heads={config.get('num_key_value_heads')} != num_attention_heads={n_heads}")
    quant = config.get("quantization_config")
    require(quant is None or quant.get("quant_method") == "fp8",
            f"quantization_config.quant_method={quant and quant.get('quant_method')!r} (only fp8)")

    max_seq_len = config["max_position_embeddings"]
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        yarn = {"original_seq_len": max_seq_len}
    elif kind == "yarn":
        original = rope["original_max_position_embeddings"]
        require(max_seq_len > original, f"yarn with max_position_embeddings={max_seq_len} <= original_max_"
                f"position_embeddings={original} (DeepSeek applies YaRN only to an extended context)")
        require(rope.get("attention_factor") is None, "an explicit rope attention_factor")
        require(bool(rope.get("truncate", True)), "yarn truncate=false")
        yarn = {"original_seq_len": original, "rope_factor": float(rope["factor"]),
                "beta_fast": rope.get("beta_fast") or 32, "beta_slow": rope.get("beta_slow") or 1,
                "mscale": float(rope.get("mscale") or 0.0),
                "mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0)}
    else:
        raise ValueError(f"unsupported DeepseekV3 config: rope type {kind!r} (default or yarn)")

    return ModelArgs(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        inter_dim=config["intermediate_size"],
        moe_inter_dim=config["moe_intermediate_size"],
        n_layers=config["num_hidden_layers"],
        n_dense_layers=config["first_k_dense_replace"],
        n_heads=n_heads,
        n_routed_experts=config["n_routed_experts"],
        n_shared_experts=config["n_shared_experts"],
        n_activated_experts=config["num_experts_per_tok"],
        n_expert_groups=config["n_group"],
        n_limited_groups=config["topk_group"],
        score_func=config.get("scoring_func", "sigmoid"),
        route_scale=float(config["routed_scaling_factor"]),
        norm_topk_prob=bool(config["norm_topk_prob"]),
        q_lora_rank=config["q_lora_rank"] or 0,
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        max_seq_len=max_seq_len,
        rope_theta=float(rope_theta),
        mtp_depth=config.get("num_nextn_predict_layers", 0),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        **yarn,
    ).validate()


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32, eos_token_id: int | None = None) -> dict:
    """A DeepseekV3 config.json (the released layout: ``rope_theta`` + ``rope_scaling``) for ``args``;
    ``eos_token_id``: the tokenizer's end of document, also the beginning of one (documents are separated by it,
    as GPT-style corpora are), else transformers' defaults for DeepseekV3 (0 and 1)."""
    rope_scaling = None
    if args.uses_yarn:
        rope_scaling = {"type": "yarn", "factor": args.rope_factor, "original_max_position_embeddings":
                        args.original_seq_len, "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                        "mscale": args.mscale, "mscale_all_dim": args.mscale_all_dim}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "scoring_func": args.score_func,
        "topk_method": "noaux_tc",
        "routed_scaling_factor": args.route_scale,
        "norm_topk_prob": args.norm_topk_prob,
        "moe_layer_freq": 1,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "rms_norm_eps": args.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": args.mtp_depth,
        "initializer_range": args.init_std,
        "bos_token_id": 0 if eos_token_id is None else eos_token_id,
        "eos_token_id": 1 if eos_token_id is None else eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
