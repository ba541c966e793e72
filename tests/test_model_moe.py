"""DeepSeekMoE: gate vs a per-token reference, dispatcher vs a dense reference, balance loss, bias update."""

import pytest
import torch

from haillm.models.deepseek_v3 import DeepSeekV3, get_preset, max_violation
from haillm.models.deepseek_v3.balance import sequence_balance_loss
from haillm.models.deepseek_v3.moe import MoE


def reference_gate(x, weight, bias, args):
    """Obviously-correct routing, one token at a time with Python lists (REFERENCE §2.4).

    The logits come from the same batched fp32 GEMM the gate runs: what is checked is the routing after it. A
    per-token matvec sums in another order, and on an AVX-512 CPU its logits differed from the GEMM's by
    2.4e-6 (at |logit| = 9), which moves the softmax weights by more than the 1e-6 compared below."""
    n_experts, per_group = args.n_routed_experts, args.n_routed_experts // args.n_expert_groups
    all_w, all_i = [], []
    for logits in torch.nn.functional.linear(x, weight):
        scores = logits.sigmoid() if args.score_func == "sigmoid" else logits.softmax(-1)
        biased = (scores + bias).tolist()
        groups = range(args.n_expert_groups)
        group_score = {g: sum(sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)[:2]) for g in groups}
        kept = sorted(groups, key=lambda g: -group_score[g])[: args.n_limited_groups]
        if args.n_expert_groups == 1:
            kept = [0]
        candidates = [e for e in range(n_experts) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -biased[e])[: args.n_activated_experts]
        w = scores[chosen]
        if args.norm_topk_prob:
            w = w / w.sum()
        all_w.append(w * args.route_scale)
        all_i.append(torch.tensor(chosen))
    return torch.stack(all_w), torch.stack(all_i)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # tiny: sigmoid, 4 groups keep 2, top-2, normalised
        {"n_routed_experts": 16, "n_expert_groups": 4, "n_limited_groups": 3, "n_activated_experts": 5},
        {
            "score_func": "softmax",
            "norm_topk_prob": False,
            "n_expert_groups": 1,
            "n_limited_groups": 1,
            "route_scale": 1.0,
            "n_activated_experts": 3,
        },
        {"score_func": "softmax", "norm_topk_prob": True, "n_expert_groups": 2, "n_limited_groups": 1},
    ],
)
def test_gate_matches_reference(changes):
    args = get_preset("tiny").replace(**changes).validate()
    moe = MoE(args)
    gen = torch.Generator().manual_seed(0)
    moe.gate.weight.data = torch.randn(args.n_routed_experts, args.dim, generator=gen) * 0.3
    moe.gate.bias.copy_(torch.randn(args.n_routed_experts, generator=gen) * 0.1)
    x = torch.randn(64, args.dim, generator=gen)
    weights, indices, scores = moe.gate(x)
    ref_w, ref_i = reference_gate(x, moe.gate.weight.data, moe.gate.bias, args)
    order, ref_order = indices.argsort(-1), ref_i.argsort(-1)
    assert torch.equal(indices.gather(1, order), ref_i.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-7)
    assert scores.shape == (64, args.n_routed_experts)


def test_moe_layer_matches_dense_reference():
    """Sorted dispatch + per-expert matmuls + weighted combine == sum_k w_k expert_k(x) + shared(x)."""
    args = get_preset("tiny")
    model = DeepSeekV3(args, init_seed=0)
    moe = model.layers["1"].ffn
    x = torch.randn(3, 10, args.dim)
    y = moe(x)
    flat = x.reshape(-1, args.dim)
    weights, indices, _ = moe.gate(flat)
    ref = moe.shared_experts(flat)
    for t in range(flat.shape[0]):
        for j in range(indices.shape[1]):
            ref[t] += weights[t, j] * moe.experts[str(indices[t, j].item())](flat[t])
    torch.testing.assert_close(y.reshape(-1, args.dim), ref, rtol=1e-5, atol=1e-7)


def reference_balance_loss(scores, indices, alpha):
    bsz, seq_len, n = scores.shape
    k = indices.shape[-1]
    total = 0.0
    for b in range(bsz):
        f = [n / (k * seq_len) * sum(int(i in indices[b, t].tolist()) for t in range(seq_len)) for i in range(n)]
        p = [sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(seq_len)) / seq_len for i in range(n)]
        total += alpha * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    return total / bsz


def test_balance_loss_is_alpha_at_perfect_balance():
    """Golden value (REFERENCE §2.5): f_i = 1 and P_i = 1/N_r give L_Bal = alpha, exactly."""
    n, k, seq_len, alpha = 8, 2, 16, 1e-4
    scores = torch.full((3, seq_len, n), 0.5)
    indices = torch.tensor([[(t * k + j) % n for j in range(k)] for t in range(seq_len)]).expand(3, -1, -1)
    assert sequence_balance_loss(scores, indices, alpha).item() == torch.tensor(alpha).item()  # fp32 alpha


def test_balance_loss_matches_reference_and_grads_only_through_scores():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 7, 8, generator=gen).requires_grad_()
    indices = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(14)]).view(2, 7, 3)
    loss = sequence_balance_loss(scores, indices, 0.01)
    assert loss.item() == pytest.approx(reference_balance_loss(scores.detach(), indices, 0.01), rel=1e-6)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_alpha_zero_gives_exact_zero_and_no_balance_graph():
    args = get_preset("tiny").replace(balance_alpha=0.0)
    model = DeepSeekV3(args)
    out = model.compute_loss(torch.randint(0, args.vocab_size, (2, 17)))
    assert out["balance_loss"].item() == 0.0
    assert all(m.balance_loss is None for m in model.moe_layers())
    torch.testing.assert_close(out["loss"].detach(), out["lm_loss"] + out["mtp_loss"], rtol=0, atol=0)


def test_loads_tracking_and_max_violation():
    args = get_preset("tiny")
    model = DeepSeekV3(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    model.train()
    model(tokens)
    loads = model.moe_loads()
    n_moe = args.n_moe_layers + args.mtp_depth
    assert loads.shape == (n_moe, args.n_routed_experts) and loads.dtype == torch.float32
    # main layers saw 2*16 tokens with top-k each; the MTP block was not run by forward()
    assert loads[: args.n_moe_layers].sum(-1).tolist() == [32.0 * args.n_activated_experts] * args.n_moe_layers
    assert loads[args.n_moe_layers :].sum().item() == 0
    model.eval()
    model(tokens)
    assert torch.equal(model.moe_loads(), loads)  # eval forwards are not counted
    model.reset_moe_loads()
    assert model.moe_loads().sum().item() == 0
    assert max_violation(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]])) == pytest.approx(1.0)
    assert max_violation(torch.zeros(2, 4)) == 0.0


def test_update_gate_bias_sign_rule():
    args = get_preset("tiny")
    model = DeepSeekV3(args)
    n_moe = len(model.moe_layers())
    loads = torch.arange(args.n_routed_experts, dtype=torch.float32).repeat(n_moe, 1)  # mean 3.5
    model.update_gate_bias(loads, 0.01)
    expected = 0.01 * torch.tensor([1.0] * 4 + [-1.0] * 4)
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.bias, expected)
        assert not moe.gate.bias.requires_grad and moe.gate.bias.dtype == torch.float32
    assert "layers.1.ffn.gate.bias" in model.state_dict()
    assert "layers.1.ffn.gate.bias" not in dict(model.named_parameters())
    model.update_gate_bias(loads, 0.0)
    assert torch.equal(model.moe_layers()[0].gate.bias, expected)


def _moe_max_vio_after(gamma: float, steps: int) -> float:
    """One MoE layer on inputs with a common mean direction (as real hidden states have), so the random gate
    prefers some experts: max_vio of the last 5 steps' loads after ``steps`` bias updates."""
    args = get_preset("tiny").replace(n_routed_experts=16, n_activated_experts=4)
    moe = MoE(args).train()
    gen = torch.Generator().manual_seed(0)
    moe.gate.weight.data = torch.randn(args.n_routed_experts, args.dim, generator=gen)
    mean_dir = torch.randn(args.dim, generator=gen)
    loads = torch.zeros(args.n_routed_experts)
    with torch.no_grad():
        for step in range(steps):
            moe.tokens_per_expert.zero_()
            moe(mean_dir + torch.randn(4, 64, args.dim, generator=gen))
            moe.update_bias(moe.tokens_per_expert, gamma)
            if step >= steps - 5:
                loads += moe.tokens_per_expert
    return max_violation(loads)


def test_bias_update_moves_load_toward_balance():
    """Fast version of issue 3's check (the 200-step figure on the trained tiny model is
    bench/bias_balance.py)."""
    without, with_bias = _moe_max_vio_after(0.0, 60), _moe_max_vio_after(0.01, 60)
    assert without > 1.0  # the setup really is imbalanced
    assert with_bias < 0.5 * without
