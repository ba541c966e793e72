"""MLA: RoPE/YaRN tables and scales vs transformers' formulas, interleaved rotation vs a complex-number
reference, and the absorbed latent-cache inference path vs the training path."""

import math

import pytest
import torch

from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.models.deepseek_v3.mla import apply_rope, rope_inv_freq, rope_tables, softmax_scale

YARN = {"max_seq_len": 2048, "original_seq_len": 256, "rope_factor": 8.0, "mscale": 0.9, "mscale_all_dim": 0.7}


def test_apply_rope_rotates_adjacent_pairs():
    """out[2j] = x[2j] cos - x[2j+1] sin, out[2j+1] = x[2j] sin + x[2j+1] cos with angle pos * inv_freq[j],
    on a non-contiguous slice (as q_rope is) and on an odd-offset one (which needs a copy)."""
    args = get_preset("tiny")
    angles = torch.arange(5, dtype=torch.float64)[:, None] * rope_inv_freq(args).double()[None, :]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [T, 1, r/2] against x's [B, T, H, r/2]
    for nope in (16, 3):
        x = torch.randn(2, 5, 3, nope + args.qk_rope_head_dim, dtype=torch.float64)[..., nope:]
        a, b = x[..., 0::2], x[..., 1::2]
        ref = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        out = apply_rope(x, angles.cos(), angles.sin())
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_v3_yarn_correction_range_and_scale():
    """REFERENCE §2.3 derived values for V3 at 16K context: dims <= 10 unchanged, >= 23 divided by 40,
    mscale^2 = 1.8739 and softmax scale ~ 0.13523."""
    args = get_preset("v3_671b").replace(max_seq_len=16384)
    base = 1.0 / (args.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    inv_freq = rope_inv_freq(args)
    torch.testing.assert_close(inv_freq[:11], base[:11])
    torch.testing.assert_close(inv_freq[23:], base[23:] / 40)
    assert ((inv_freq[11:23] < base[11:23]) & (inv_freq[11:23] > base[11:23] / 40)).all()
    assert softmax_scale(args) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(args) == pytest.approx(0.13523, abs=1e-5)
    assert softmax_scale(get_preset("v3_671b")) == 192**-0.5  # 4K pre-training context: no YaRN


@pytest.mark.parametrize("rope", [{}, YARN, {**YARN, "mscale_all_dim": 0.0}])
def test_rope_matches_transformers(rope):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    args = get_preset("tiny").replace(**rope)
    if rope:
        params = {
            "rope_type": "yarn",
            "rope_theta": args.rope_theta,
            "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            "mscale": args.mscale,
        }
        if args.mscale_all_dim:
            params["mscale_all_dim"] = args.mscale_all_dim
    else:
        params = {"rope_type": "default", "rope_theta": args.rope_theta}
    cfg = transformers.DeepseekV3Config(
        hidden_size=args.dim,
        num_attention_heads=args.n_heads,
        qk_rope_head_dim=args.qk_rope_head_dim,
        qk_nope_head_dim=args.qk_nope_head_dim,
        max_position_embeddings=args.max_seq_len,
        rope_parameters=params,
    )
    if rope:
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    else:
        dim = args.qk_rope_head_dim
        hf_inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, dim, 2).float() / dim)
        hf_factor = 1.0
    torch.testing.assert_close(rope_inv_freq(args), hf_inv_freq, rtol=0, atol=0)
    cos, _ = rope_tables(args)
    assert cos[0, 0].item() == pytest.approx(hf_factor, rel=1e-6)
    hf_scale = yarn_apply_mscale(cfg.rope_parameters, (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5)
    assert softmax_scale(args) == pytest.approx(hf_scale, rel=1e-12)


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 0, **YARN}])
def test_absorbed_inference_matches_training_path(changes):
    args = get_preset("tiny").replace(init_std=0.05, **changes)
    model = DeepSeekV3(args, init_seed=1).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=gen)
    with torch.no_grad():
        ref = model(tokens)
        other = tokens.clone()
        other[:, 3] = (other[:, 3] + 1) % args.vocab_size
        # attention mixes positions far above the tolerance, so the comparison below is meaningful
        assert (model(other)[:, 10:] - ref[:, 10:]).abs().max() > 1e-3

    cache = model.new_inference_cache(batch_size=2, max_len=48)
    assert cache.kv.shape[-1] + cache.pe.shape[-1] == args.kv_lora_rank + args.qk_rope_head_dim
    torch.testing.assert_close(model.forward_inference(tokens, 0, cache), ref, rtol=0, atol=1e-5)

    cache = model.new_inference_cache(batch_size=2, max_len=48)
    steps = [model.forward_inference(tokens[:, i : i + 1], i, cache) for i in range(tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, rtol=0, atol=1e-5)

    cache = model.new_inference_cache(batch_size=2, max_len=48)
    chunks = [model.forward_inference(tokens[:, :17], 0, cache), model.forward_inference(tokens[:, 17:], 17, cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), ref, rtol=0, atol=1e-5)
