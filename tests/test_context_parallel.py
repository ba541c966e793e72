"""Context parallelism (haillm.parallel.context) layer by layer: MLA with the latent exchange on 2 and 4 forked
gloo ranks under NCCL's rules (tests/dist.py) against one process, in outputs and gradients (fp32), at 1024
tokens and at 4096 (where the causal balance of the chunks matters); the chunk layout; the bytes exchanged.

The parent computes the reference once; each rank runs the same weights on its two chunks. A rank's loss is
the weighted sum of its own outputs (the ranks' shares add up to the reference loss), so the parameters'
gradients summed over the ranks are the reference's, and a rank's input gradient is its chunks' share."""


import copy
import gc

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed
from memory_probe import storage_bytes
from saved_tensors import saved_storages
from test_tensor_parallel import assert_close, check_grads

import haillm.parallel.context as context_mod
from haillm.models.deepseek_v3 import get_preset
from haillm.models.deepseek_v3.mla import MLA, rope_tables
from haillm.models.deepseek_v3.model import DeepSeekV3, init_weights
from haillm.models.deepseek_v3.moe import MoE
from haillm.parallel.context import NO_CP, ContextParallel, apply_context_parallel
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.pipeline.stage import StageSpec
from haillm.parallel.tensor import NO_TP, TensorParallel
from haillm.parallel.tensor_plan import parallelize_tensor
from haillm.tools.activations import ActivationSetup, chunk_bytes

TOL = 1e-6


def mla_case(seq_len: int, bsz: int):
    args = get_preset("tiny").replace(max_seq_len=seq_len)
    mla = MLA(args)
    init_weights(mla, 0, 0.1, prefix="attn.")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(bsz, seq_len, args.dim, generator=gen)
    weight = torch.randn(bsz, seq_len, args.dim, generator=gen)
    cos, sin = rope_tables(args)
    return mla, x, weight, cos, sin


def reference(seq_len: int, bsz: int) -> dict[str, torch.Tensor]:
    mla, x, weight, cos, sin = mla_case(seq_len, bsz)
    x.requires_grad_()
    y = mla(x, cos, sin)
    (y * weight).sum().backward()
    return {"y": y.detach(), "x": x.grad, **{n: p.grad for n, p in mla.named_parameters()}}


def _parallel_mla(seq_len: int, bsz: int, expected: dict[str, torch.Tensor], recompute: bool) -> int:
    size, rank = dist.get_world_size(), dist.get_rank()
    cp = ContextParallel(dist.group.WORLD, size, rank)
    mla, x, weight, cos, sin = mla_case(seq_len, bsz)
    mla.cp, mla.recompute_up_proj = cp, recompute
    where = cp.positions(seq_len)
    x_local = cp.local(x).requires_grad_()
    y = mla(x_local, cos[where], sin[where])
    (y * cp.local(weight)).sum().backward()
    assert_close(y.detach(), cp.local(expected["y"]), "output")
    assert_close(x_local.grad, cp.local(expected["x"]), "input grad")
    for name, p in mla.named_parameters():
        dist.all_reduce(p.grad)
        assert_close(p.grad, expected[name], f"grad {name}")
    return size


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,bsz", [(1024, 2), (4096, 1)])
def test_mla_with_latent_exchange_matches_one_process(seq_len, bsz):
    expected = reference(seq_len, bsz)
    for world, recompute in ((2, False), (4, True)):
        assert run_distributed(_parallel_mla, world, args=(seq_len, bsz, expected, recompute)) == [world] * world


def test_chunks_are_balanced_and_gather_restores_the_order():
    """Rank r holds chunks r and 2cp-1-r; gathering the ranks' local parts restores the sequence."""
    seq = torch.arange(16).view(1, 16)
    parts = [ContextParallel(None, 4, r).local(seq) for r in range(4)]
    assert [p.tolist()[0] for p in parts[:2]] == [[0, 1, 14, 15], [2, 3, 12, 13]]
    assert torch.equal(ContextParallel(None, 4, 3).positions(16), torch.tensor([6, 7, 8, 9]))
    gathered = torch.stack(parts)
    assert torch.equal(context_mod._chunk_major(gathered).movedim(0, 1).flatten(1, 2), seq)
    assert torch.equal(context_mod._rank_major(seq.unflatten(1, (8, -1)).movedim(1, 0), 4), gathered)
    # the causal work (query-key pairs) of the two chunks is the same on every rank
    work = [sum(c + 1 for c in ContextParallel(None, 4, r).chunks) for r in range(4)]
    assert len(set(work)) == 1


def _gathered_bytes(seq_len: int) -> list[int]:
    size, rank = dist.get_world_size(), dist.get_rank()
    cp = ContextParallel(dist.group.WORLD, size, rank)
    mla, x, weight, cos, sin = mla_case(seq_len, 1)
    mla.cp = cp
    sent = []
    real = context_mod.all_gather_single

    def counting(out, inp, **kwargs):
        sent.append(inp.nbytes * (size - 1))  # each rank's block reaches the size - 1 others
        return real(out, inp, **kwargs)

    context_mod.all_gather_single = counting
    where = cp.positions(seq_len)
    mla(cp.local(x).bfloat16(), cos[where], sin[where])
    return sent


@pytest.mark.slow
def test_latent_exchange_bytes():
    """Bytes each rank sends per layer and local token: (kv_lora_rank + qk_rope_head_dim) x 2 (bf16) x
    (cp - 1), i.e. (kv_lora_rank + qk_rope_head_dim) x 2 x (cp - 1) / cp per token of the sequence."""
    args, seq_len, world = get_preset("tiny"), 256, 4
    sent = run_distributed(_gathered_bytes, world, args=(seq_len,))
    per_token = (args.kv_lora_rank + args.qk_rope_head_dim) * 2
    for rank_sent in sent:
        assert len(rank_sent) == 1
        assert rank_sent[0] == per_token * (world - 1) * seq_len // world


def _planner_case(seq_len: int, micro_batch: int):
    args = get_preset("tiny").replace(max_seq_len=seq_len)
    batch = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return args, batch, StageSpec(0, range(args.n_layers), first=True, last=True)


def _kept_and_planned(recompute: bool, cp: ContextParallel, tp: TensorParallel = NO_TP, seq_len: int = 256,
                      micro_batch: int = 2) -> tuple[int, float]:
    """On this rank: the bytes a training forward of `tiny` keeps for backward, by autograd's count with the
    recompute recipes' arguments, and the planner's figure for them."""
    args, batch, whole = _planner_case(seq_len, micro_batch)
    model = DeepSeekV3(args, init_seed=0)
    parallelize_tensor(model, tp)
    apply_context_parallel(model, cp)
    model.set_recompute(recompute, recompute)
    kept, losses = saved_storages(model, lambda: model.compute_loss(batch), recipe_arguments=True)
    losses["loss"].backward()
    setup = ActivationSetup(act_bytes=4, recompute=recompute, cpu=True, swiglu=recompute, cp=cp.size, tp=tp.size,
                            sequence_parallel=tp.sequence_parallel)
    return sum(kept.values()), chunk_bytes(args, whole, micro_batch, seq_len, setup, True)


def _kept_bytes() -> dict[tuple[bool, int], tuple[int, float]]:
    """``_kept_and_planned`` with recompute off and on, at cp=1 (the whole model on the whole sequence, every
    rank alike) and at cp=world."""
    size, rank = dist.get_world_size(), dist.get_rank()
    return {(recompute, cp_size): _kept_and_planned(recompute, ContextParallel(dist.group.WORLD, size, rank)
                                                    if cp_size > 1 else NO_CP)
            for recompute in (False, True) for cp_size in (1, size)}


@pytest.mark.slow
def test_activations_per_rank_at_cp4_and_the_planner():
    """What a training forward of `tiny` keeps for backward on each of 4 ranks at cp=4 is at most 0.3x of what
    one process keeps for the same sequences (measured: 0.254x, and 0.294x with recompute, on every rank), and
    the planner (haillm.tools.activations) says so within 3% (it models the rank holding the sequences' ends,
    whose MTP head copies its valid rows: the most; measured: within 0.12%). Counted as ``_planner_at_cp2_tp2``
    counts, by autograd and the recompute recipes, under NCCL's rules: not by the allocator, in whose profile
    gloo's threads sometimes drop the last reference to a collective's temporary unrecorded (on a loaded machine
    rank 0's count once came to 0.3055x)."""
    for rank, per_rank in enumerate(run_distributed(_kept_bytes, 4)):
        for recompute in (False, True):
            (whole, whole_planned), (mine, planned) = per_rank[recompute, 1], per_rank[recompute, 4]
            assert mine <= 0.3 * whole, (rank, recompute, mine / whole)
            assert whole_planned == pytest.approx(whole, rel=0.03), (rank, recompute)
            assert planned == pytest.approx(mine, rel=0.03), (rank, recompute)


def _planner_at_cp2_tp2(cp: ContextParallel, tp: TensorParallel) -> None:
    """At cp=2 x tp=2 (sequence parallel), with recompute off and on: the planner within 3% of what a training
    forward keeps for backward, by autograd's count with the recompute recipes' arguments (measured: within
    1.3%). Not the allocator's: it would also see gloo's threads drop the last reference to a collective's
    temporary input at times, unrecorded (a block of 16 KB to 128 KB that stays allocated in the profile)."""
    for recompute in (False, True):
        kept, planned = _kept_and_planned(recompute, cp, tp)
        assert planned == pytest.approx(kept, rel=0.03), recompute


def _live_tensors_after_steps(steps: int) -> list[int]:
    """Bytes of the CPU tensors alive (after a garbage collection) at the end of each of ``steps`` training
    forward-backward passes of `tiny` at cp=world, recompute on."""
    size, rank = dist.get_world_size(), dist.get_rank()
    args = get_preset("tiny").replace(max_seq_len=256)
    model = DeepSeekV3(args, init_seed=0)
    apply_context_parallel(model, ContextParallel(dist.group.WORLD, size, rank))
    model.set_recompute(True, True)
    alive = []
    for step in range(steps):
        batch = torch.randint(0, args.vocab_size, (2, 257), generator=torch.Generator().manual_seed(step))
        model.compute_loss(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)
        gc.collect()
        tensors = (o for o in gc.get_objects() if isinstance(o, torch.Tensor))
        alive.append(storage_bytes(t for t in tensors if t.device.type == "cpu"))
    return alive


@pytest.mark.slow
def test_a_step_leaves_nothing_behind():
    """The attention's merged output, which its node saves and hands to the key-chunk nodes in backward, must
    not close a reference cycle through the autograd graph: it did (each step kept its attention outputs, and
    a 32K-token run of `small` at cp=4 grew 0.6 GB per step per rank until the OOM killer stopped it)."""
    for alive in run_distributed(_live_tensors_after_steps, 2, args=(3,), nccl_rules=False):
        assert alive[2] == alive[1], alive


def _objective_case() -> tuple:
    """`tiny` with two MTP depths (the MoE layers of depth k leave out the last k positions) and a balance loss
    strong enough to show in the total, and a batch of 64-token sequences."""
    args = get_preset("tiny").replace(vocab_size=512, mtp_depth=2, balance_alpha=0.1, init_std=0.1)
    batch = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(3))
    return args, batch


def _objective(model: DeepSeekV3, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    out = model.compute_loss(batch)
    out["loss"].backward()
    return {**{k: v.detach() for k, v in out.items()}, "loads": model.moe_loads().clone()}


def _objective_with_cp_and_tp(expected: dict[str, torch.Tensor], reference: DeepSeekV3) -> int:
    """At cp=2 alone, and at cp=2 x tp=2 with and without sequence parallelism: the losses averaged over cp
    (a rank's are means over its own positions; the balance loss is whole on every rank), the routed loads
    summed over cp and tp, and the gradients averaged over cp (partial ones summed over tp first)."""
    dims = ParallelDims(cp=2, tp=2, world_size=4).build()
    cp = ContextParallel(dims.cp_group, 2, dims.cp_rank)
    args, batch = _objective_case()
    checked = 0
    sequence_parallel = TensorParallel(dims.tp_group, 2, dims.tp_rank, True)
    for tp in (NO_TP, sequence_parallel, sequence_parallel.replicated()):
        what = f"cp=2 tp={tp.size} sequence_parallel={tp.sequence_parallel}"
        model = DeepSeekV3(args, init_seed=0)
        placements = parallelize_tensor(model, tp)
        apply_context_parallel(model, cp)
        out = _objective(model, batch)
        for key in ("loss", "lm_loss", "mtp_loss"):
            dist.all_reduce(out[key], group=cp.group)
            assert_close(out[key] / 2, expected[key], f"{what}: {key}")
        assert_close(out["balance_loss"], expected["balance_loss"], f"{what}: balance_loss")
        dist.all_reduce(out["loads"], group=None if tp.enabled else cp.group)  # each rank routes its own tokens
        assert torch.equal(out["loads"], expected["loads"]), what
        for p in model.parameters():
            dist.all_reduce(p.grad, group=cp.group)
            p.grad /= 2
        checked += check_grads(reference, model, placements, tp, what, 1e-5)
    _tail_on_sequence_shards(cp, sequence_parallel)
    _planner_at_cp2_tp2(cp, sequence_parallel)
    return checked


def _moe_balance(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training forward's balance loss, routed loads, and the router's gradient from the balance loss."""
    moe.train()
    moe(x)
    moe.balance_loss.backward()
    return moe.balance_loss.detach(), moe.tokens_per_expert.clone(), moe.gate.weight.grad


def _tail_on_sequence_shards(cp: ContextParallel, tp: TensorParallel) -> None:
    """A lone MoE layer whose last 3 positions have no target (``tail``, as an MTP depth's) on sequence shards
    of this rank's chunks (the model runs its MTP blocks in replicated mode, so only this shows the shards'
    offsets): the balance loss, the loads and the router's gradient as one process's."""
    args = get_preset("tiny").replace(balance_alpha=0.1)
    x = torch.randn(2, 64, args.dim, generator=torch.Generator().manual_seed(4))
    reference = MoE(args)
    init_weights(reference, 0, 0.1, prefix="ffn.")
    moe = copy.deepcopy(reference)
    reference.tail = moe.tail = 3  # one process holds the sequence's end: NO_CP.holds_end
    expected = _moe_balance(reference, x)
    moe.tp, moe.cp = tp, cp
    loss, loads, grad = _moe_balance(moe, cp.local(x).chunk(tp.size, 1)[tp.rank])
    assert_close(loss, expected[0], "balance loss on sequence shards")
    dist.all_reduce(loads)
    assert torch.equal(loads, expected[1]), (loads, expected[1])
    dist.all_reduce(grad)  # partial over tp, averaged over cp
    assert_close(grad / cp.size, expected[2], "router gradient on sequence shards")


@pytest.mark.slow
def test_objective_with_tensor_parallelism_matches_one_process():
    """The whole model's objective under cp=2, and cp=2 x tp=2 with and without sequence parallelism, against one
    process: the losses (the balance loss at 0.1, whose statistics the cp and tp ranks sum, the MTP depths
    leaving out the positions past the end), the routed loads and every gradient, fp32 within 1e-5; on the same
    ranks, the planner's activations at cp=2 x tp=2 (``_planner_at_cp2_tp2``)."""
    args, batch = _objective_case()
    model = DeepSeekV3(args, init_seed=0)
    expected = _objective(model, batch)
    assert expected["balance_loss"] > 0.01 * expected["loss"]
    checked = run_distributed(_objective_with_cp_and_tp, 4, args=(expected, model))
    assert checked == [3 * len(list(model.parameters()))] * 4
