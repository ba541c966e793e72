"""DeepSeek-V3 model arguments and presets.

Field names follow DeepSeek's ``inference/model.py`` ``ModelArgs`` so published configs map one to one; the
training-only fields (MTP, balancing, init) follow the V3 report. Plain types only, so the dataclass can be a
Hydra structured config as is.
"""

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelArgs:
    """Architecture and training-objective hyper-parameters of one DeepSeek-V3-family model.

    RoPE/YaRN: YaRN (frequency blending and the attention factors) is active only when
    ``max_seq_len > original_seq_len`` and ``rope_factor > 1`` (DeepSeek's rule), so pre-training at the
    original context runs plain RoPE and raising ``max_seq_len`` switches context extension on.
    ``mscale`` and ``mscale_all_dim`` have Hugging Face's meaning: with ``m(f, a) = 0.1*a*ln(f) + 1`` the
    softmax scale is multiplied by ``m(f, mscale_all_dim)^2`` (when mscale_all_dim != 0) and the rotary
    cos/sin by ``m(f, mscale) / m(f, mscale_all_dim)`` (or ``m(f, 1)`` when either is 0). DeepSeek's own
    ``mscale`` is the softmax one; its configs always have both equal, which makes the rotary factor 1.

    Gate: weights come from unbiased scores of the selected experts and are renormalised to sum 1 when
    ``norm_topk_prob`` (Hugging Face's switch; the published sigmoid configs set it), then scaled by
    ``route_scale``.
    """

    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    # MoE
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"
    route_scale: float = 1.0
    norm_topk_prob: bool = False
    # MLA
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE / YaRN
    max_seq_len: int = 4096
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # Training objective
    mtp_depth: int = 0
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_update_speed: float = 0.001
    rms_norm_eps: float = 1e-6
    init_std: float = 0.006

    @property
    def n_moe_layers(self) -> int:
        """MoE layers of the main model (MTP blocks are MoE too but counted separately)."""
        return self.n_layers - self.n_dense_layers

    @property
    def uses_yarn(self) -> bool:
        return self.max_seq_len > self.original_seq_len and self.rope_factor > 1

    def validate(self) -> "ModelArgs":
        """Raise ValueError with one clear line for an inconsistent config; return self."""
        positive = [
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_seq_len",
            "original_seq_len",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.q_lora_rank < 0 or self.mtp_depth < 0:
            raise ValueError("model.q_lora_rank and model.mtp_depth must be >= 0")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"model.n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"model.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.n_dense_layers > 0 and self.inter_dim <= 0:
            raise ValueError("model.inter_dim must be > 0 when there are dense layers")
        if self.n_moe_layers == 0 and self.mtp_depth == 0:
            return self
        # MoE layers exist (MTP blocks are always MoE blocks).
        if self.moe_inter_dim <= 0 or self.n_routed_experts <= 0 or self.n_shared_experts < 0:
            raise ValueError("model.moe_inter_dim and model.n_routed_experts must be > 0 for MoE layers")
        if not 1 <= self.n_activated_experts <= self.n_routed_experts:
            raise ValueError(
                f"model.n_activated_experts={self.n_activated_experts} must be in "
                f"[1, n_routed_experts={self.n_routed_experts}]"
            )
        if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
            raise ValueError(
                f"model.n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_expert_groups={self.n_expert_groups}"
            )
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ValueError(
                f"model.n_limited_groups={self.n_limited_groups} must be in [1, n_expert_groups={self.n_expert_groups}]"
            )
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and per_group < 2:
            raise ValueError("model: each expert group needs >= 2 experts (group score = sum of its top-2)")
        if self.n_activated_experts > self.n_limited_groups * per_group:
            raise ValueError(
                f"model.n_activated_experts={self.n_activated_experts} exceeds the "
                f"{self.n_limited_groups * per_group} experts of the n_limited_groups kept groups"
            )
        return self

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


# The run presets (`model=<name>`, conf/model/<name>.yaml) are these, except that `tiny` and `small` take the
# tokenizer's vocabulary there (model.vocab_size=0, resolved by haillm.config.compose_config); the published
# models keep theirs. The vocab_size below is what a model built in Python from the preset gets.
PRESETS: dict[str, ModelArgs] = {
    # CPU smoke/CI model: every feature (dense + MoE layers, q compression, groups, MTP) at toy size.
    "tiny": ModelArgs(
        vocab_size=512,
        dim=64,
        inter_dim=128,
        moe_inter_dim=32,
        n_layers=4,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        score_func="sigmoid",
        route_scale=2.5,
        norm_topk_prob=True,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=512,
        original_seq_len=512,
        mtp_depth=1,
    ),
    # CPU benchmark model (~ a few hundred tokens/s on 2 cores).
    "small": ModelArgs(
        vocab_size=8192,
        dim=384,
        inter_dim=1024,
        moe_inter_dim=128,
        n_layers=6,
        n_dense_layers=1,
        n_heads=6,
        n_routed_experts=32,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        score_func="sigmoid",
        route_scale=2.5,
        norm_topk_prob=True,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_seq_len=2048,
        original_seq_len=2048,
        mtp_depth=1,
    ),
    # DeepSeek-V3 inference/configs/config_16B.json (V2-Lite shape); V2-Lite has no MTP.
    "v2_lite_16b": ModelArgs(mscale=0.707, mscale_all_dim=0.707),
    # DeepSeek-V3 inference/configs/config_671B.json + report §4.2 (MTP depth 1). max_seq_len is the 4K
    # pre-training context, so YaRN is off; raise it (e.g. 32768) for context extension.
    "v3_671b": ModelArgs(
        vocab_size=129280,
        dim=7168,
        inter_dim=18432,
        moe_inter_dim=2048,
        n_layers=61,
        n_dense_layers=3,
        n_heads=128,
        n_routed_experts=256,
        n_shared_experts=1,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
        score_func="sigmoid",
        route_scale=2.5,
        norm_topk_prob=True,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_seq_len=4096,
        original_seq_len=4096,
        rope_factor=40.0,
        mtp_depth=1,
    ),
}


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of a preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
