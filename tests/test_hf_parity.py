"""Hugging Face DeepseekV3 checkpoints: our model against transformers' implementation, both directions.

Weights are re-randomised at unit gain (not transformers' std-0.02 init, which leaves logits almost
independent of the layers) and the gate's correction bias is random, so a wrong mapping, a wrong routing
rule or a wrong RoPE/YaRN detail moves logits far beyond the 1e-4 tolerance.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from haillm.models.deepseek_v3.args import get_preset  # noqa: E402
from haillm.models.deepseek_v3.hf import (  # noqa: E402
    args_from_hf_config,
    hf_config_from_args,
    load_hf,
    load_hf_state,
    our_name_to_hf,
    save_hf,
)
from haillm.models.deepseek_v3.model import DeepSeekV3  # noqa: E402

TOL = 1e-4
SEQ_LEN = 24  # longer than the YaRN configs' original context (16)

BASE = dict(
    vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=3, num_key_value_heads=3, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=3, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
    v_head_dim=10,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-6,
)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1)
CONFIGS = {
    # Query without compression, one expert group, plain RoPE.
    "plain": dict(q_lora_rank=None, n_group=1, topk_group=1),
    # Query compression, 4 groups of which 2 kept, YaRN as released (mscale == mscale_all_dim); rope dim and
    # theta chosen so the YaRN ramp (low=0, high=2) blends a frequency and depends on the original length.
    "yarn": dict(q_lora_rank=24, n_group=4, topk_group=2, qk_rope_head_dim=16, rope_theta=100.0,
                 rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    # YaRN with a rotary attention factor != 1, no top-k renormalisation, two shared experts.
    "yarn_rotary_factor": dict(q_lora_rank=16, n_group=2, topk_group=1, norm_topk_prob=False,
                               routed_scaling_factor=1.0, n_shared_experts=2,
                               rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.5)),
}


def hf_config(name: str) -> "transformers.DeepseekV3Config":
    return transformers.DeepseekV3Config(**{**BASE, **CONFIGS[name]})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Unit-gain weights (std fan_in^-0.5), norm weights around 1, routing bias of the scores' spread."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else noise * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "gate.bias")):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def hf_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf.eval()(tokens).logits


def our_logits(model: DeepSeekV3, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def tokens_for(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """A random transformers model saved with save_pretrained, with its logits on fixed tokens."""
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(request.param))
    randomize_(hf, seed=1)
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(path)
    tokens = tokens_for(BASE["vocab_size"])
    return request.param, path, tokens, hf_logits(path, tokens)


def test_load_hf_matches_transformers_logits(hf_checkpoint):
    name, path, tokens, expected = hf_checkpoint
    model = load_hf(path)
    assert model.args.q_lora_rank == (CONFIGS[name]["q_lora_rank"] or 0)
    assert model.args.n_expert_groups == CONFIGS[name]["n_group"]
    assert model.args.uses_yarn == ("rope_scaling" in CONFIGS[name])
    assert model.args.mtp_depth == 0  # save_pretrained writes no MTP layer
    got = our_logits(model, tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL

    # The tolerance is meaningful: routing without the correction bias gives clearly different logits.
    for moe in model.moe_layers():
        moe.gate.bias.zero_()
    assert (our_logits(model, tokens) - expected).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("max_shard_bytes", [4 << 30, 40_000])
def test_save_hf_loads_in_transformers_and_round_trips_mtp(hf_checkpoint, tmp_path, max_shard_bytes):
    name, _, tokens, _ = hf_checkpoint
    args = args_from_hf_config(hf_config(name).to_dict()).replace(mtp_depth=1)
    torch.manual_seed(0)
    model = DeepSeekV3(args)
    model.init_weights(0)
    randomize_(model, seed=2)
    save_hf(model, tmp_path / "a", max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "a" / "model.safetensors.index.json").exists() == (max_shard_bytes < 1 << 20)

    assert (hf_logits(tmp_path / "a", tokens) - our_logits(model, tokens)).abs().max().item() < TOL

    # MTP module 0 is decoder layer n_layers, with copies of the shared embedding and head.
    stored = {}
    for file in (tmp_path / "a").glob("*.safetensors"):
        stored.update(load_file(file))
    mtp = f"model.layers.{args.n_layers}"
    assert torch.equal(stored[f"{mtp}.eh_proj.weight"], model.mtp["0"].eh_proj.weight)
    assert torch.equal(stored[f"{mtp}.shared_head.norm.weight"], model.mtp["0"].norm.weight)
    assert torch.equal(stored[f"{mtp}.embed_tokens.weight"], model.embed.weight)
    assert torch.equal(stored[f"{mtp}.shared_head.head.weight"], model.head.weight)
    assert torch.equal(stored[f"{mtp}.mlp.gate.e_score_correction_bias"], model.mtp["0"].block.ffn.gate.bias)

    # load -> save -> load keeps every tensor, MTP included, bitwise.
    reloaded = load_hf(tmp_path / "a")
    assert reloaded.args == args
    save_hf(reloaded, tmp_path / "b", max_shard_bytes=max_shard_bytes)
    again = load_hf(tmp_path / "b")
    for loaded in (reloaded, again):
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        assert any(k.startswith("mtp.0.block.ffn.experts.") for k in got)
        for k in want:
            assert torch.equal(want[k], got[k]), k


def test_mtp_module_matches_transformers_mtp_layer(tmp_path, monkeypatch):
    """Our MTP module 0 (from save_hf) against transformers' generic ``MtpModel`` reading the same layer
    n_layers: ``head(norm(block(eh_proj([enorm(emb); hnorm(h)]))))`` for the same ``h``."""
    mtp_model = getattr(transformers.modeling_layers, "MtpModel", None)
    if mtp_model is None:
        pytest.skip("this transformers version has no MtpModel")
    args = args_from_hf_config(hf_config("yarn").to_dict()).replace(mtp_depth=1)
    torch.manual_seed(0)
    model = DeepSeekV3(args)
    randomize_(model, seed=4)
    save_hf(model, tmp_path)
    # transformers finds MTP weights through this pattern, which it hard-codes for V3's layer 61.
    monkeypatch.setattr(transformers.DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected",
                        [rf"model\.layers\.{args.n_layers}\..*"])
    main = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager")
    hf_mtp = mtp_model.from_pretrained(main).eval()

    tokens = tokens_for(args.vocab_size)
    seq_len = tokens.shape[1] - 1
    h = torch.randn(2, seq_len, args.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf_mtp.forward_layer(0, h, torch.arange(seq_len)[None], None, input_ids=tokens[:, 1:])
        expected = hf_mtp._project_to_logits(out)
        mtp = model.eval().mtp["0"]
        cos, sin = model.rope_cos[:seq_len], model.rope_sin[:seq_len]
        got = model.head(mtp.norm(mtp(h, model.embed(tokens[:, 1:]), cos, sin)))
    assert (got - expected).abs().max().item() < TOL


def test_fused_expert_layout_is_read(hf_checkpoint, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I])."""
    _, path, tokens, expected = hf_checkpoint
    state = load_file(path / "model.safetensors")
    n_experts, fused = BASE["n_routed_experts"], {}
    for layer in range(BASE["first_k_dense_replace"], BASE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        per_expert = {p: [state.pop(f"{prefix}.{e}.{p}.weight") for e in range(n_experts)]
                      for p in ("gate_proj", "up_proj", "down_proj")}
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(per_expert["gate_proj"], per_expert["up_proj"], strict=True)])
        fused[f"{prefix}.down_proj"] = torch.stack(per_expert["down_proj"])
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({**state, **fused}, tmp_path / "model.safetensors")
    assert (our_logits(load_hf(tmp_path), tokens) - expected).abs().max().item() < TOL


@pytest.mark.parametrize("block", [128, 16])
def test_fp8_checkpoint_is_dequantized_on_load(tmp_path, block):
    """Projection weights stored as e4m3 + <name>_scale_inv (as released); the rest stays as it was."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [block, block]}
    args = args_from_hf_config(dict(BASE, q_lora_rank=24, n_group=2, topk_group=1, intermediate_size=150))
    torch.manual_seed(0)
    model = DeepSeekV3(args.replace(mtp_depth=1))
    model.init_weights(0)
    randomize_(model, seed=3)
    save_hf(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    quantized = {n: quantize_blockwise(t, block) for n, t in state.items() if n.endswith("proj.weight")}
    assert any(q.shape[0] > block for q, _ in quantized.values())  # a partial edge block when block=128
    for name, (q, scale) in quantized.items():
        state[name], state[name + "_scale_inv"] = q, scale
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, quantization_config=quant)))

    loaded = load_hf(tmp_path).state_dict()
    original = model.state_dict()
    for ours in original:
        hf_name = our_name_to_hf(ours, args.n_layers)
        if hf_name not in quantized:
            assert torch.equal(loaded[ours], original[ours]), ours
            continue
        q, scale = quantized[hf_name]
        assert torch.equal(loaded[ours], dequant_reference(q, scale, block)), ours
        # Within FP8 rounding: half an e4m3 ulp at 448 is 16, i.e. amax/28 of the block.
        bound = block_amax(original[ours], block) / 28
        assert ((loaded[ours] - original[ours]).abs() <= bound).all(), ours
        assert not torch.equal(loaded[ours], original[ours]), ours


def quantize_blockwise(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference FP8 weight quantization: scale = amax/448 per block (edge blocks partial)."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            scale[i, j] = w[tile].abs().amax().clamp_min(1e-4) / 448
            q[tile] = (w[tile] / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def dequant_reference(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale[i, j]
    return out


def block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    """Each element's block amax, same shape as ``w``."""
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], block):
        for j in range(0, w.shape[1], block):
            out[i:i + block, j:j + block] = w[i:i + block, j:j + block].abs().amax()
    return out


def test_released_v3_config_maps_to_the_v3_preset():
    """DeepSeek-V3's published config.json (values as released) is the v3_671b preset with YaRN to 160K."""
    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
        "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128,
        "vocab_size": 129280,
    }
    args = args_from_hf_config(released)
    assert args == get_preset("v3_671b").replace(max_seq_len=163840)
    assert args_from_hf_config(hf_config_from_args(args)) == args


@pytest.mark.parametrize("change, message", [
    (dict(scoring_func="softmax_plus"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)), "rope type"),
    (dict(rope_scaling=dict(YARN)), "original_max_position_embeddings"),  # YaRN without an extended context
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(quantization_config={"quant_method": "gptq"}), "quant_method"),
])
def test_unsupported_config_values_raise(change, message):
    config = dict(BASE, q_lora_rank=None, n_group=1, topk_group=1, max_position_embeddings=16, **change)
    with pytest.raises(ValueError, match=message):
        args_from_hf_config(config)


def test_missing_mtp_weights_are_an_error_unless_allowed(hf_checkpoint):
    name, path, _, _ = hf_checkpoint
    model = DeepSeekV3(args_from_hf_config(hf_config(name).to_dict()).replace(mtp_depth=1))
    with pytest.raises(ValueError, match="mtp.0"):
        load_hf_state(model, path)
    load_hf_state(model, path, allow_missing_mtp=True)
    assert torch.equal(model.embed.weight, load_file(path / "model.safetensors")["model.embed_tokens.weight"])


def test_checkpoint_config_must_fit_the_model(hf_checkpoint):
    name, path, _, _ = hf_checkpoint
    args = args_from_hf_config(hf_config(name).to_dict())
    model = DeepSeekV3(args.replace(route_scale=1.5, rope_theta=1234.0), init_seed=None)
    with pytest.raises(ValueError, match=r"route_scale=.* \(model: 1.5\).*rope_theta"):
        load_hf_state(model, path)


def test_partial_model_loads_only_what_it_holds(hf_checkpoint):
    """As an expert-parallel rank (some experts removed) or a pipeline stage (some layers removed)."""
    name, path, _, _ = hf_checkpoint
    full = load_hf(path)
    part = DeepSeekV3(full.args, init_seed=None)
    del part.layers["2"]
    for e in ("0", "5"):
        del part.layers["1"].ffn.experts[e]
    load_hf_state(part, path)
    want = full.state_dict()
    for k, v in part.state_dict().items():
        assert torch.equal(v, want[k]), k
