"""Tensor and sequence parallelism, layer by layer, against the single-process modules on 2 and 4 forked gloo
ranks under NCCL's rules (tests/dist.py): MLA, the dense FFN, the MoE layer (shared experts, router, routed
experts, balance loss), embedding + vocabulary-parallel head and cross-entropy, and the whole model with its
MTP module, in outputs and gradients, with and without sequence parallelism, in fp32.

Each rank computes the reference itself on the same inputs, then the same weights split over the ranks. The
loss of a rank is its own share: the outputs of its sequence shard under sequence parallelism (the ranks'
shares add up to the reference loss), the whole output in replicated mode (every rank holds the same loss)."""

import copy

import pytest
import torch
from dist import run_distributed

import haillm.ops.linear as linear_mod
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.models.deepseek_v3.balance import take_balance_loss
from haillm.models.deepseek_v3.mla import MLA, rope_tables
from haillm.models.deepseek_v3.model import Block, init_weights
from haillm.models.deepseek_v3.moe import MLP, MoE
from haillm.models.deepseek_v3.mtp import MTPModule
from haillm.parallel.mesh import ParallelConfigError, ParallelDims
from haillm.parallel.tensor import TensorParallel
from haillm.parallel.tensor_plan import TpPlacement, check_divisible, parallelize_tensor, sum_partial_grads

BSZ, SEQ = 2, 8
TOL = 1e-6
MODEL_TOL = 1e-5


def tiny_args():
    return get_preset("tiny").replace(vocab_size=512)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    """fp32 parity up to summation order: max |a - b| <= tol * max |b| (as tests/test_expert.py)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def local_block(t: torch.Tensor, dim: int | None, tp: TensorParallel) -> torch.Tensor:
    return t if dim is None else t.chunk(tp.size, dim)[tp.rank]


def check_grads(ref: torch.nn.Module, par: torch.nn.Module, placements: dict[str, TpPlacement],
                tp: TensorParallel, what: str, tol: float = TOL) -> int:
    """Every parameter's gradient on this rank against its block of the reference's; returns how many."""
    sum_partial_grads(par, placements, tp)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    checked = 0
    for name, p in par.named_parameters():
        expected = ref_grads[name]
        if expected is None:
            assert p.grad is None or not p.grad.any(), f"{what}: {name} has a gradient the reference lacks"
            continue
        assert p.grad is not None, f"{what}: {name} got no gradient"
        assert_close(p.grad, local_block(expected, placements[name].shard_dim, tp), f"{what} grad {name}", tol)
        checked += 1
    return checked


def moe_layers_of(module: torch.nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def seq_share(t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's sequence shard of a whole [B, T, ...] tensor (sequence parallel), else the whole."""
    return t.chunk(tp.size, 1)[tp.rank] if tp.sequence_parallel else t


def run_layer(ref: torch.nn.Module, forward, x: torch.Tensor, tp: TensorParallel, what: str,
              with_balance: bool = False) -> int:
    """Reference and tensor-parallel run of ``forward(module, x)`` with a random linear loss of the output."""
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    par = copy.deepcopy(ref)
    placements = parallelize_tensor(par, tp)
    x_ref = x.clone().requires_grad_()
    y_ref = forward(ref, x_ref)
    loss = (y_ref * weight).sum()
    if with_balance:
        loss = loss + take_balance_loss(moe_layers_of(ref), loss)
    loss.backward()
    x_par = seq_share(x, tp).clone().requires_grad_()
    y_par = forward(par, x_par)
    assert_close(y_par, seq_share(y_ref.detach(), tp), f"{what} output")
    loss_par = (y_par * seq_share(weight, tp)).sum()
    if with_balance:
        loss_par = loss_par + take_balance_loss(moe_layers_of(par), loss_par)
    loss_par.backward()
    assert_close(x_par.grad, seq_share(x_ref.grad, tp), f"{what} input grad")
    return check_grads(ref, par, placements, tp, what)


class _Holder(torch.nn.Module):
    """A lone layer under the name it has in the model, so that parallelize_tensor sees a model."""

    def __init__(self, args, name: str, layer: torch.nn.Module) -> None:
        super().__init__()
        self.args, self.name = args, name
        self.add_module(name, layer)

    @property
    def layer(self) -> torch.nn.Module:
        return getattr(self, self.name)


def _layer_checks(tp: TensorParallel) -> dict[str, int]:
    args = tiny_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BSZ, SEQ, args.dim, generator=gen)
    cos, sin = rope_tables(args)
    cos, sin = cos[:SEQ], sin[:SEQ]
    counts = {}

    def holder(name: str, layer: torch.nn.Module, prefix: str) -> _Holder:
        init_weights(layer, 0, 0.1, prefix=prefix)
        return _Holder(args, name, layer)

    mla = holder("attn", MLA(args), "layers.0.attn")
    counts["mla"] = run_layer(mla, lambda m, h: m.layer(h, cos, sin), x, tp, "MLA")
    no_lora = args.replace(q_lora_rank=0)
    mla_plain = _Holder(no_lora, "attn", MLA(no_lora))
    init_weights(mla_plain.attn, 0, 0.1, prefix="layers.0.attn")
    counts["mla_no_q_lora"] = run_layer(mla_plain, lambda m, h: m.layer(h, cos, sin), x, tp, "MLA without q-LoRA")
    ffn = holder("ffn", MLP(args.dim, args.inter_dim), "layers.0.ffn")
    counts["ffn"] = run_layer(ffn, lambda m, h: m.layer(h), x, tp, "dense FFN")
    moe = holder("ffn", MoE(args), "layers.1.ffn")
    moe.train()
    counts["moe"] = run_layer(moe, lambda m, h: m.layer(h), x, tp, "MoE (shared experts, router, experts)",
                              with_balance=True)
    block = Block(args, args.n_layers)  # an MoE block, as the MTP module has
    mtp = holder("mtp", MTPModule(args, block), "mtp.0")
    mtp.train()
    # the MTP module runs in replicated mode under sequence parallelism too: whole inputs and outputs
    counts["mtp"] = run_layer(mtp, lambda m, h: m.layer(h, h.flip(1) * 0.5, cos, sin), x, tp.replicated(), "MTP",
                              with_balance=True)
    return counts


def _vocab_checks(tp: TensorParallel) -> dict[str, int]:
    """Embedding + vocabulary-parallel head and cross-entropy, both ways of the fused loss (gradients in
    forward, and recomputed in backward), over several row blocks, with a sequence shard and a whole input."""
    args = tiny_args()
    counts = {}
    seq = 96  # 192 rows: 3 blocks of the head's 64-row minimum
    tokens = torch.randint(0, args.vocab_size, (BSZ, seq + 1), generator=torch.Generator().manual_seed(2))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for grads_in_forward in (True, False):
        linear_mod.CE_WGRAD_BYTES_PER_TOKEN = (1 << 30) if grads_in_forward else 0
        linear_mod.CE_BLOCK_BYTES = 0  # the fewest rows per block (64): several blocks
        for whole in (False, True):
            model = DeepSeekV3(args.replace(mtp_depth=0), init_seed=0)
            ref = _VocabPart(model)
            par = copy.deepcopy(ref)
            placements = parallelize_tensor(par, tp)
            loss = ref(inputs, targets, TensorParallel())
            loss.backward()
            loss_par = par(inputs, targets, tp if whole else None)
            assert_close(loss_par.detach(), loss.detach(), "vocabulary-parallel cross-entropy")
            loss_par.backward()
            what = f"embedding + head (grads in forward {grads_in_forward}, whole input {whole})"
            counts[what] = check_grads(ref, par, placements, tp, what)
    return counts


class _VocabPart(torch.nn.Module):
    """``head.cross_entropy_sum(embed(inputs) * scale, targets)``: the embedding, the head and the loss alone;
    with ``whole`` the scaled shard is gathered before the head (as the MTP modules take it)."""

    def __init__(self, model: DeepSeekV3) -> None:
        super().__init__()
        self.args, self.embed, self.head = model.args, model.embed, model.head
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, model.args.dim))

    def forward(self, inputs, targets, whole: TensorParallel | None):
        emb = self.embed(inputs) * self.scale
        if whole is not None:
            emb = whole.gather_sequence(emb)
        return self.head.cross_entropy_sum(emb, targets)


def _model_checks(tp: TensorParallel) -> dict[str, int]:
    """The whole model's objective (main head, MTP module, balance losses) and every gradient."""
    args = tiny_args().replace(init_std=0.1)
    batch = torch.randint(0, args.vocab_size, (BSZ, SEQ + 1), generator=torch.Generator().manual_seed(3))
    ref = DeepSeekV3(args, init_seed=0)
    par = copy.deepcopy(ref)
    placements = parallelize_tensor(par, tp)
    out = ref.compute_loss(batch)
    out["loss"].backward()
    out_par = par.compute_loss(batch)
    for key in ("lm_loss", "mtp_loss", "balance_loss"):
        assert_close(out_par[key], out[key], f"model {key}")
    out_par["loss"].backward()
    return {"model": check_grads(ref, par, placements, tp, "model", MODEL_TOL)}


def _tp_worker(world: int) -> list[dict[str, int]]:
    dims = ParallelDims(tp=world, world_size=world).build()
    results = []
    for sequence_parallel in (False, True):
        tp = TensorParallel(dims.tp_group, world, dims.tp_rank, sequence_parallel)
        results.append({**_layer_checks(tp), **_vocab_checks(tp), **_model_checks(tp)})
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_layers_match_single_process(world):
    results = run_distributed(_tp_worker, world, args=(world,), timeout=180)
    for per_rank in results:
        for counts in per_rank:
            assert all(n > 0 for n in counts.values()), counts
            assert counts["model"] == len(list(DeepSeekV3(tiny_args(), init_seed=None).parameters()))


def test_split_halves_attention_and_ffn_parameters():
    """At tp=2 a rank stores half of MLA's up-projections and wo, of the FFN, of the shared experts and of the
    embedding and head (storage bytes); the down-projections, norms, router and routed experts stay whole."""
    args = tiny_args()
    model = DeepSeekV3(args, init_seed=0)
    full = {n: p.untyped_storage().nbytes() for n, p in model.named_parameters()}
    placements = parallelize_tensor(model, TensorParallel(None, 2, 1, True))
    for name, p in model.named_parameters():
        expected = full[name] // 2 if placements[name].shard_dim is not None else full[name]
        assert p.untyped_storage().nbytes() == expected, name
    split = {n for n, pl in placements.items() if pl.shard_dim is not None}
    assert {"layers.0.attn.wq_b.weight", "layers.0.attn.wkv_b.weight", "layers.0.attn.wo.weight",
            "layers.0.ffn.w1.weight", "layers.1.ffn.shared_experts.w2.weight", "embed.weight",
            "head.weight"} <= split
    assert not any(".experts." in n or "gate" in n or "norm" in n or "_a." in n for n in split)
    with pytest.raises(RuntimeError, match="gives no whole logits"):  # never a block of the logits as if whole
        model.head(torch.zeros(1, args.dim))


@pytest.mark.parametrize(("changes", "message"), [
    (dict(n_heads=3), "model.n_heads=3 is not divisible by parallel.tp=2"),
    (dict(inter_dim=130), "model.inter_dim=130 is not divisible by parallel.tp=4"),
    (dict(vocab_size=258), "model.vocab_size=258 is not divisible by parallel.tp=4"),
])
def test_indivisible_widths_are_refused(changes, message):
    tp = 2 if "n_heads" in changes else 4
    with pytest.raises(ParallelConfigError, match=message.replace("*", r"\*")):
        check_divisible(tiny_args().replace(**changes), tp)


@pytest.mark.parametrize(("overrides", "world", "message"), [
    (["parallel.tp=3"], 3, "parallel.tp=3 must divide parallel.ranks_per_node=8"),
    (["parallel.tp=2", "model.n_heads=3"], 2, "model.n_heads=3 is not divisible by parallel.tp=2"),
    (["parallel.tp=4"], 4, "model.vocab_size=258 is not divisible by parallel.tp=4"),
    (["parallel.tp=2", "train.seq_len=33"], 2, "train.seq_len=33 must be divisible by parallel.tp=2"),
    (["parallel.tp=2", "train.compile=true"], 2, "train.compile=true is not supported with parallel.tp=2"),
])
def test_bad_tensor_parallel_configs_are_refused_in_one_line(overrides, world, message):
    from haillm.config import ConfigError, compose_config, validate

    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
