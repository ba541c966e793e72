"""Expert parallelism: the all-to-all dispatcher against the single-process MoE layer on forked gloo ranks
(tests/dist.py), node-limited routing, split (asynchronous) phases, the FP8 payload, and placement rules."""

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed

from haillm.fp8 import act_dequant, act_quant, calc_diff
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.models.deepseek_v3.experts import per_expert_state
from haillm.models.deepseek_v3.model import init_weights
from haillm.models.deepseek_v3.moe import MoE
from haillm.parallel.expert import (
    AllToAllDispatcher,
    ExpertPlacement,
    apply_expert_parallel,
)
from haillm.parallel.mesh import ParallelConfigError, ParallelDims

# 16 experts in 4 groups of 4, 2 groups kept, top-3: at ep=4 each rank holds exactly one group.
ARGS = dict(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
SEQ = 6


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    """fp32 parity up to summation order: max |a - b| <= tol * max |b|. The EP layer sums the same products
    in another order (per-rank partial sums, other matmul shapes), so an elementwise rtol on entries that
    are themselves the difference of large terms would test rounding luck, not correctness."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


def make_moe(args, seed: int = 0) -> MoE:
    """The real MoE layer with weights large enough that errors would show (std 0.1, not 0.006)."""
    moe = MoE(args)
    init_weights(moe, seed, 0.1, prefix="layers.1.ffn")
    return moe


def rank_batch(args, world: int, rank: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """Global inputs and output-grads shared by every rank; rank r owns r+1 sequences (uneven)."""
    gen = torch.Generator().manual_seed(seed)
    n_seq = world * (world + 1) // 2
    x = torch.randn(n_seq, SEQ, args.dim, generator=gen)
    g = torch.randn(n_seq, SEQ, args.dim, generator=gen)
    start = rank * (rank + 1) // 2
    return x, g, slice(start, start + rank + 1)


def bias_gate(moe: MoE) -> None:
    """Uneven loads and idle experts: expert 0 is popular, group 2 (experts 8-11) is never chosen, so at
    ep=4 rank 2 receives no tokens at all and at ep=2 experts 8-11 of rank 1 get none."""
    moe.gate.bias.zero_()
    moe.gate.bias[0] = 0.3
    moe.gate.bias[8:12] = -1.0


def per_expert_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``named_parameters()`` with the stacked routed experts split into their experts (views carrying the
    matching ``.grad`` views), named by global id as in ``state_dict()``: the same names whatever experts a
    rank holds."""
    pieces, params = per_expert_state(module), {}
    for name, p in module.named_parameters():
        for piece, offset, shape in pieces(name, p):
            def cut(t, offset=offset, shape=shape):
                return None if t is None else t.detach().flatten()[offset : offset + shape.numel()].view(shape)
            params[piece] = cut(p)
            params[piece].grad = cut(p.grad)
    return params


def ep_setup(args, fp8: bool = False, ranks_per_node: int | None = None) -> tuple[MoE, AllToAllDispatcher]:
    placement = ExpertPlacement(
        args.n_routed_experts, dist.get_world_size(), dist.get_rank(), ranks_per_node, args.n_expert_groups
    )
    dispatcher = AllToAllDispatcher(dist.group.WORLD, placement, fp8=fp8)
    moe = make_moe(args)
    apply_expert_parallel(moe, dispatcher)
    return moe, dispatcher


def _parity_worker(changes: dict) -> dict:
    changes = dict(changes)
    inside = changes.pop("gate_weights_inside", False)  # the weights travel with the tokens and come back
    args = get_preset("tiny").replace(**ARGS, **changes)
    world, rank = dist.get_world_size(), dist.get_rank()
    x_all, g_all, mine = rank_batch(args, world, rank)
    ref, (moe, dispatcher) = make_moe(args), ep_setup(args)
    for m in (ref, moe):
        bias_gate(m)
        m.train()
        m.gate_weights_inside = inside
    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * g_all).sum().backward()
    x = x_all[mine].clone().requires_grad_()
    y = moe(x)
    (y * g_all[mine]).sum().backward()

    assert_matches(y, y_ref[mine].detach())
    assert_matches(x.grad, x_ref.grad[mine])
    ref_params = per_expert_params(ref)
    local = {str(e) for e in dispatcher.placement.local_expert_ids}
    assert {n.split(".")[1] for n in moe.state_dict() if n.startswith("experts.")} == local  # global ids
    for name, p in per_expert_params(moe).items():
        ref_grad = ref_params[name].grad
        if name.startswith("experts."):  # lives on this rank only: its grad is the whole batch's
            assert_matches(p.grad, ref_grad)  # zero for an expert that got no tokens anywhere
        else:  # gate and shared experts are replicated: per-rank grads sum to the reference
            grad = p.grad.clone()
            dist.all_reduce(grad)
            assert_matches(grad, ref_grad)
    loads = moe.tokens_per_expert.clone()
    dist.all_reduce(loads)
    assert torch.equal(loads, ref.tokens_per_expert)
    return {"loads": loads.tolist(), "received": sum(int(loads[int(e)]) for e in local)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("changes", [{}, {"score_func": "softmax", "norm_topk_prob": False, "n_shared_experts": 0},
                                     {"gate_weights_inside": True}])
def test_ep_moe_matches_single_process(world, changes):
    results = run_distributed(_parity_worker, world, args=(changes,))
    loads = torch.tensor(results[0]["loads"])
    assert loads[8:12].sum() == 0 and loads[0] == loads.max() and (loads > 0).sum() >= 8  # the intended skew
    if world == 4:
        assert results[2]["received"] == 0  # one rank really received no tokens


def _model_worker() -> dict:
    """The whole tiny model (3 MoE layers incl. the MTP block) built on the meta device, sharded, then
    materialised: same weights as the full model, same loss and gradients."""
    args = get_preset("tiny")
    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.device("meta"):
        model = DeepSeekV3(args, init_seed=None)
    placement = ExpertPlacement(args.n_routed_experts, world, rank, None, args.n_expert_groups)
    apply_expert_parallel(model, AllToAllDispatcher(dist.group.WORLD, placement))
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    ref = DeepSeekV3(args, init_seed=0)
    batch = torch.randint(0, args.vocab_size, (2 * world, 17), generator=torch.Generator().manual_seed(3))
    ref_loss = ref.compute_loss(batch)["loss"]
    ref_loss.backward()
    loss = model.compute_loss(batch[2 * rank : 2 * rank + 2])["loss"]
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    assert abs(mean_loss.item() / world - ref_loss.item()) <= 1e-6 * ref_loss.item()
    ref_params = per_expert_params(ref)
    n_experts = 0
    for name, p in per_expert_params(model).items():
        assert torch.equal(p.detach(), ref_params[name].detach()), name  # same seed, same weights, any layout
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if ".experts." in name:  # already summed over every rank's tokens; the global loss is the mean
            n_experts += 1
        else:
            dist.all_reduce(grad)
        ref_grad = ref_params[name].grad
        assert_matches(grad / world, ref_grad if ref_grad is not None else torch.zeros_like(p))
    loads = model.moe_loads()
    dist.all_reduce(loads)
    assert torch.equal(loads, ref.moe_loads())
    return {"expert_params": n_experts}


@pytest.mark.parametrize("world", [2, 4])
def test_ep_model_matches_single_process(world):
    args = get_preset("tiny")
    per_expert, n_moe = 3, args.n_moe_layers + args.mtp_depth  # w1, w2, w3
    results = run_distributed(_model_worker, world)
    assert [r["expert_params"] for r in results] == [n_moe * per_expert * args.n_routed_experts // world] * world


def _node_limit_worker(n_limited_groups: int) -> tuple[dict, int]:
    args = get_preset("tiny").replace(**{**ARGS, "n_activated_experts": 6, "n_limited_groups": n_limited_groups})
    moe, dispatcher = ep_setup(args, ranks_per_node=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    x_all, _, mine = rank_batch(args, world, rank)
    x = x_all[mine].reshape(-1, args.dim)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        token_ids = torch.arange(x_all.shape[0] * SEQ).view(x_all.shape[:2])[mine].reshape(-1)
        tagged = torch.cat([token_ids.unsqueeze(1).float(), x], dim=1)  # the payload carries its global id
        routed, _, _, _ = dispatcher.dispatch(tagged, indices)
    received = [None] * world
    dist.all_gather_object(received, set(routed[:, 0].long().tolist()))
    max_ranks = max(sum(t in r for r in received) for t in range(x_all.shape[0] * SEQ))
    return dispatcher.stats(dist.group.WORLD), max_ranks


def test_node_limited_routing_bounds_ranks_per_token():
    """4 ranks = 4 nodes, one expert group each, top-6 from 2 kept groups: every token reaches <= 2 ranks
    (counted from what the ranks actually received) and the logged figures agree; without the group
    limit the same routing reaches more than 2."""
    limited = run_distributed(_node_limit_worker, 4, args=(2,))
    for stats, max_ranks in limited:
        assert max_ranks <= 2
        assert stats["max_nodes_per_token"] <= 2 and stats["max_ranks_per_token"] <= 2
        assert 1 <= stats["nodes_per_token"] <= 2 and stats["nodes_per_token"] == stats["ranks_per_token"]
    free = run_distributed(_node_limit_worker, 4, args=(4,))
    assert free[0][1] > 2 and free[0][0]["max_nodes_per_token"] > 2


def _async_worker() -> list[torch.Tensor]:
    """Two micro-batches in flight at once, unrelated compute in between, against the synchronous call."""
    args = get_preset("tiny").replace(**ARGS)
    moe, dispatcher = ep_setup(args)
    bias_gate(moe)
    world, rank = dist.get_world_size(), dist.get_rank()
    batches = [rank_batch(args, world, rank, seed=s) for s in (1, 2)]
    inputs = [x_all[mine].reshape(-1, args.dim) for x_all, _, mine in batches]

    def run(split: bool) -> list[torch.Tensor]:
        moe.zero_grad(set_to_none=True)
        xs = [x.clone().requires_grad_() for x in inputs]
        routes = [moe.gate(x) for x in xs]
        if not split:
            ys = [dispatcher(x, w, i, None, moe.experts) for x, (w, i, _) in zip(xs, routes, strict=True)]
        else:
            handles = [dispatcher.start_dispatch(x, i) for x, (_, i, _) in zip(xs, routes, strict=True)]
            busy = torch.randn(256, 256) @ torch.randn(256, 256)  # work while the payloads travel
            routed = [dispatcher.finish_dispatch(h) for h in handles]
            combines = [
                dispatcher.start_combine(dispatcher.compute(moe.experts, rx, c), h)
                for (rx, c, _), h in zip(routed, handles, strict=True)
            ]
            busy = busy @ busy
            ys = [dispatcher.finish_combine(c, w) for c, (w, _, _) in zip(combines, routes, strict=True)]
        sum(((y - 1) ** 2).sum() for y in ys).backward()
        return [*ys, *(x.grad for x in xs), *(p.grad for p in moe.parameters() if p.grad is not None)]

    return [torch.equal(a, b) for a, b in zip(run(False), run(True), strict=True)]


def test_split_phases_match_synchronous_call():
    for equal in run_distributed(_async_worker, 2):
        assert equal and all(equal)


def _fp8_worker() -> dict:
    args = get_preset("tiny").replace(**ARGS, dim=320)  # 2 full 128-tiles and a partial one per token
    world, rank = dist.get_world_size(), dist.get_rank()
    x_all, g_all, mine = rank_batch(args, world, rank)
    x = x_all[mine].reshape(-1, args.dim) * 3  # several binades of magnitude
    moe, high = ep_setup(args)
    low = AllToAllDispatcher(dist.group.WORLD, high.placement, fp8=True)
    weights, indices, _ = moe.gate(x)
    y_high = high(x, weights, indices, None, moe.experts)
    high_bytes = high.stats()["dispatch_bytes"]
    x_low = x.clone().requires_grad_()
    y_low = low(x_low, weights, indices, None, moe.experts)
    # The one FP8 error source is the 1x128 round trip of the payload: quantizing first and sending in
    # fp32 must give the FP8 result (up to fp32 rounding of the scale multiply).
    y_rt = high(act_dequant(*act_quant(x)), weights, indices, None, moe.experts)
    y_low.backward(g_all[mine].reshape(-1, args.dim))
    low_bytes = low.stats()["dispatch_bytes"]
    # gate weights sent with the tokens: their 4 bytes ride in the FP8 payload row and their gradients come
    # back in the dispatch's reverse exchange, bit for bit what an fp32 payload carries
    inside = {}
    for name, d, x_in in (("fp8", low, x), ("roundtrip", high, act_dequant(*act_quant(x)))):
        w_in = weights.detach().clone().requires_grad_()
        y_in = d(x_in, w_in, indices, None, moe.experts, True)
        y_in.backward(g_all[mine].reshape(-1, args.dim))
        inside[name] = y_in.detach(), w_in.grad
    return {
        "inside_roundtrip": (inside["fp8"][0] - inside["roundtrip"][0]).abs().max().item(),
        "inside_weight_grads": (inside["fp8"][1] - inside["roundtrip"][1]).abs().max().item(),
        "inside_weight_grad_scale": inside["roundtrip"][1].abs().max().item(),
        "roundtrip": (y_low - y_rt).abs().max().item(),
        "diff": calc_diff(y_low, y_high),
        "payload_diff": calc_diff(act_dequant(*act_quant(x)), x),
        "grad_finite": bool(x_low.grad.isfinite().all()),
        "bytes": low_bytes / high_bytes,
    }


def test_fp8_payload_within_fp8_error():
    """Plumbing: sending FP8 equals quantizing first and sending fp32 (checked exactly above). Magnitude, with
    DeepGEMM/DeepEP's calc_diff = |a-b|^2 / (|a|^2 + |b|^2): E4M3 keeps 3 mantissa bits, so a normal value
    moves by at most half a spacing, 2^-4 of its binade's base; averaged over a binade that gives
    calc_diff ≈ 2^-8 / 14 ≈ 2.8e-4 for the payload (measured ≈ 3.3e-4, tiny values fall to subnormals).
    Linear maps keep this relative error; SwiGLU multiplies two branches that both carry it, which about
    doubles it (measured 5-8e-4). Bounds: 5e-4 for the payload, 2e-3 for the layer output; a wrong scale
    or a scrambled tile gives calc_diff of order 1e-1."""
    for r in run_distributed(_fp8_worker, 2):
        assert r["roundtrip"] < 1e-6 and r["inside_roundtrip"] < 1e-6
        assert r["inside_weight_grads"] <= 1e-6 * r["inside_weight_grad_scale"] and r["inside_weight_grad_scale"] > 0
        assert 0 < r["payload_diff"] < 5e-4
        assert 0 < r["diff"] < 2e-3
        assert r["grad_finite"]
        assert r["bytes"] == pytest.approx((320 + 4 * 3) / (320 * 4))  # e4m3 + 3 fp32 scales vs fp32


def test_placement_blocks_and_errors():
    p = ExpertPlacement(16, ep_size=4, ep_rank=2, ranks_per_node=2, n_expert_groups=4)
    assert list(p.local_expert_ids) == [8, 9, 10, 11] and p.n_nodes == 2 and p.experts_per_node == 8
    assert p.rank_of(torch.tensor([0, 3, 4, 15])).tolist() == [0, 0, 1, 3]
    with pytest.raises(ParallelConfigError, match="not divisible by parallel.ep=3"):
        ExpertPlacement(16, ep_size=3, ep_rank=0)
    with pytest.raises(ParallelConfigError, match="must not straddle nodes"):
        ExpertPlacement(16, ep_size=4, ep_rank=0, ranks_per_node=1, n_expert_groups=2)
    with pytest.raises(ParallelConfigError, match="whole number of nodes"):
        ExpertPlacement(16, ep_size=4, ep_rank=0, ranks_per_node=3)
    # From the mesh: tp=2 puts the two EP ranks of a group 2 global ranks apart, one per node of 2 ranks.
    dims = ParallelDims(dp=2, tp=2, ep=2, world_size=4, ranks_per_node=2, rank=3)
    p = ExpertPlacement.from_dims(dims, 16, 4)
    assert (p.ep_rank, p.ep_ranks_per_node, p.n_nodes, list(p.local_expert_ids)) == (1, 1, 2, list(range(8, 16)))
    assert ExpertPlacement.from_dims(ParallelDims(dp=4, ep=4, world_size=4, rank=0), 16).n_nodes == 1
