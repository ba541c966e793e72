"""Regional torch.compile (`train.compile=true`, haillm/train/compile.py).

Backends. The trainer's parity test runs inductor (C++ code generated and built with gcc): the numerics
that ship. The composition tests (recomputation, deferred weight gradients, FP8 linears, layer sharing,
pipeline, expert parallelism) run `aot_eager_decomp_partition`: the same dynamo capture, AOTAutograd and
min-cut partitioner as inductor, the graphs then run by eager kernels. Whether something composes (graph
breaks, guards and recompiles, custom autograd Functions, hooks, saved-tensor hooks) is settled before
code generation, and a cold inductor compile costs ~8 s per graph on 2 cores.

Tolerances. Compiled and eager fp32 differ by the order of fp32 reductions and fused arithmetic inside
the regions (inductor's fused norms and softmax; the decompositions of the composition backend): gradients
differ by ~1e-7 relative here, losses by < 1e-7 at step 1. AdamW's first steps magnify the update of
parameters whose gradient is near zero, so later steps get the data-parallel tests' 1e-5 (ZeRO reorders
reductions the same way); a wrongly traced op (a frozen weight cache, a lost deferred gradient) is off by
far more.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from dist import run_distributed
from saved_tensors import saved_storages
from test_train import launch_train
from test_train_dp import CHECKPOINTS_OFF, COMMON
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from haillm.models.deepseek_v3.args import PRESETS
from haillm.models.deepseek_v3.mla import rope_tables
from haillm.models.deepseek_v3.model import Block, DeepSeekV3
from haillm.models.deepseek_v3.moe import MLP
from haillm.ops import Linear, deferring_weight_grads, graph_breaks, set_weight_grad_deferral
from haillm.ops.precision import cast_parameters
from haillm.train import compile as regional
from haillm.train.trainer import Trainer

BACKEND = "aot_eager_decomp_partition"
SMALL = dataclasses.replace(PRESETS["tiny"], n_layers=2, mtp_depth=0)  # one dense block, one MoE block


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object across models: each test starts from none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch_of(args, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (2, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: DeepSeekV3, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.compute_loss(batch)["loss"]
    loss.backward()
    model.reset_moe_loads()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    assert got.keys() == want.keys()
    for name, g in got.items():
        scale = want[name].abs().max().clamp_min(1e-30)
        assert (g - want[name]).abs().max() <= rel * scale, name


# ---- the trainer ---------------------------------------------------------------------------------------


def _counted(train_step):
    """Trainer.train_step that also records how many graphs dynamo has compiled so far in this process, and
    keeps its records on the trainer (every rank's, not only rank 0's metrics.jsonl)."""

    @functools.wraps(train_step)
    def step(self: Trainer) -> dict:
        record = train_step(self) | {"graphs": counters["stats"]["unique_graphs"]}
        self.__dict__.setdefault("records", []).append(record)
        return record

    return step


def _records(argv: list[str]) -> list[dict]:
    rank, world, device = launch_train.init_distributed()
    cfg = launch_train.compose_config(argv)
    launch_train.validate(cfg, world)
    return launch_train.run(cfg, rank, world, device).records


def train(out: Path, world: int, *overrides: str) -> list[list[dict]]:
    """Every rank's step records of a run (pg_timeout: a rank may compile for a while before it sends)."""
    argv = [*COMMON, f"output_dir={out}", "train.steps=4", *CHECKPOINTS_OFF, *overrides]
    if world == 1:
        return [_records(argv)]
    return run_distributed(_records, world_size=world, args=(argv,), timeout=300, pg_timeout=200)


@pytest.fixture
def counted_steps(monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", _counted(Trainer.train_step))


def assert_matches(compiled: list[dict], eager: list[dict]) -> None:
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3, 4]
    for c, e in zip(compiled, eager, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-6 if c["step"] == 1 else 1e-5), c["step"]
    assert compiled[0]["graphs"] > 0  # something was compiled ...
    assert {r["graphs"] for r in compiled} == {compiled[0]["graphs"]}  # ... in the first step only


def test_trainer_compiled_matches_eager(tmp_path, counted_steps):
    """Inductor, one dense and one MoE block (each graph costs ~8 s of a cold compile here; the MTP block's
    shapes are compiled in the pipeline test): the losses of 4 optimizer steps match the eager run's, and
    nothing is compiled after the first step."""
    small = ["model.n_layers=2", "model.mtp_depth=0"]
    eager = train(tmp_path / "eager", 1, *small)[0]
    compiled = train(tmp_path / "compiled", 1, "train.compile=true", *small)[0]
    assert_matches(compiled, eager)


# ---- what composes, on the composition backend ----------------------------------------------------------


def test_compiled_model_matches_eager_and_layers_share_code():
    """fp32 loss and gradients of the whole objective match eager. Every block's regions of a kind run one
    compiled graph: a deeper model compiles nothing more, so dynamo's cache per code object (limited to 8
    entries) does not grow with the number of layers."""
    counter = CompileCounterWithBackend(BACKEND)
    eager, compiled = DeepSeekV3(SMALL, init_seed=1), DeepSeekV3(SMALL, init_seed=1)
    regions = regional.apply_compile(compiled, counter)
    assert len(regions) == 4 + 5  # norms and attention in each block; a dense FFN; a router and shared experts
    batch = batch_of(SMALL)
    want_loss, want = loss_and_grads(eager, batch)
    got_loss, got = loss_and_grads(compiled, batch)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert_close_grads(got, want, 1e-5)
    assert counter.frame_count == 5  # RMSNorm, MLA, dense MLP, Gate, shared-experts MLP (on [tokens, dim])
    deep = DeepSeekV3(dataclasses.replace(SMALL, n_layers=5), init_seed=1)
    regional.apply_compile(deep, counter)
    loss_and_grads(deep, batch)
    loss_and_grads(deep, batch)
    assert counter.frame_count == 5
    with pytest.raises(RuntimeError, match="compiled already"):
        regional.apply_compile(deep, counter)


def test_recompute_under_compile():
    """With recomputation the gradients still match eager, and backward keeps less than without it: the
    MLA up-projections are recomputed inside the compiled attention (torch.utils.checkpoint), the norm
    outputs passed between regions through recipes."""
    batch = batch_of(SMALL)
    eager, compiled, plain = (DeepSeekV3(SMALL, init_seed=1) for _ in range(3))
    for model in (eager, compiled):
        model.set_recompute(True)
    for model in (compiled, plain):
        regional.apply_compile(model, BACKEND)
    want_loss, want = loss_and_grads(eager, batch)
    got_loss, got = loss_and_grads(compiled, batch)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert_close_grads(got, want, 1e-5)
    kept, _ = saved_storages(compiled, lambda: compiled.compute_loss(batch))
    kept_plain, _ = saved_storages(plain, lambda: plain.compute_loss(batch))
    assert sum(kept.values()) < 0.9 * sum(kept_plain.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-parameters", "autocast"])
def test_compiled_bf16_matches_eager(autocast):
    """BF16 parameters, or fp32 parameters under bf16 autocast. Every expert is routed every token
    (top-k = all experts), so rounding differences cannot flip a routing decision; what remains is bf16
    rounding at other places (fused arithmetic keeps fp32 in between): a few bf16 ulps (2^-8 each)."""
    args = dataclasses.replace(SMALL, n_expert_groups=1, n_limited_groups=1, n_activated_experts=8)
    batch = batch_of(args)
    eager, compiled = DeepSeekV3(args, init_seed=1), DeepSeekV3(args, init_seed=1)
    if not autocast:
        for model in (eager, compiled):
            cast_parameters(model, torch.bfloat16)
    regional.apply_compile(compiled, BACKEND)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want_loss, want = loss_and_grads(eager, batch)
        got_loss, got = loss_and_grads(compiled, batch)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-3)
    assert_close_grads(got, want, 4 * 2**-8)


def test_deferred_weight_grads_stay_deferred():
    """Zero-bubble I/W: an I action is a backward inside deferring_weight_grads of a forward run before it,
    outside. Every linear's weight gradient must land in the queue, not in .grad: the deferrable linears run
    eagerly (a graph break), where a traced one would have fixed "not deferred" at forward time. Running the
    queue gives eager's gradients."""
    batch = batch_of(SMALL)
    eager, compiled = DeepSeekV3(SMALL, init_seed=1), DeepSeekV3(SMALL, init_seed=1)
    for model in (eager, compiled):
        set_weight_grad_deferral(model)
    regional.apply_compile(compiled, BACKEND)
    _, want = loss_and_grads(eager, batch)
    loss = compiled.compute_loss(batch)["loss"]
    with deferring_weight_grads() as queue:
        loss.backward()
    linears = [m for m in compiled.modules() if isinstance(m, Linear)]
    assert all(m.weight.grad is None for m in linears)
    assert compiled.layers["0"].attn_norm.weight.grad is not None  # no deferral for other parameters
    assert len(queue) == len(linears) + 3  # and the routed experts' three stacks
    for fn in queue:
        fn()
    assert_close_grads({n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}, want, 1e-5)


@torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True)
def test_fp8_linears_run_eagerly_and_nothing_recompiles():
    """FP8 linears inside a compiled region run eagerly (graph breaks): their weight cache, requantized when
    an optimizer step changes the weight in place, stays outside the graph. Traced, the cache's version
    check became a guard and every optimizer step recompiled (until dynamo's recompile limit turns the
    region eager). So does the fused SwiGLU that quantizes for the FP8 ``w2`` (``fp8.fused``); ``w3`` stays
    plain and traced, so the region still compiles a graph. Nothing compiles twice, even with a recompile
    limit of 1: the eager linears' calls (inputs 128 and 256 wide, one shared wrapper) are not compiled as
    frames of their own. Outputs and gradients equal the eager module's."""
    eager, compiled = MLP(128, 256), MLP(128, 256)
    torch.manual_seed(0)
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.05)
            q.copy_(p)
    for model in (eager, compiled):
        for linear in (model.w1, model.w2):
            linear.set_precision("fp8")
    counter = CompileCounterWithBackend(BACKEND)
    regional.compile_region(compiled, counter)
    x = torch.randn(64, 128)
    frames = []
    for _ in range(3):
        outs = []
        for model in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = model(xi)
            y.square().sum().backward()
            outs.append((y.detach(), xi.grad, model.w1.weight.grad.clone()))
            with torch.no_grad():  # an optimizer step: in place, as AdamW and ZeRO-1 update
                model.w1.weight.mul_(0.5)
            model.zero_grad(set_to_none=True)
        for got, want in zip(outs[1], outs[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[-1] == frames[0]


def test_marked_functions_break_the_graph_wherever_haillm_holds_them(monkeypatch):
    """``eager_in_compiled_regions`` marks without importing dynamo; ``apply_graph_breaks`` (run by the first
    compiled region) wraps each marked function in ``torch.compiler.disable`` under every name haillm's modules
    give it: its own module's, a ``from ... import`` binding elsewhere, a class's method. A fullgraph compile
    of a caller then fails on the graph break, and succeeds before; a function marked afterwards is wrapped
    at once."""
    import sys
    import types

    monkeypatch.setattr(graph_breaks, "_marked", [])
    monkeypatch.setattr(graph_breaks, "_applied", False)
    defining, importing = types.ModuleType("haillm._probe_a"), types.ModuleType("haillm._probe_b")

    @graph_breaks.eager_in_compiled_regions
    def double(x):
        return x * 2

    class Holder:
        @graph_breaks.eager_in_compiled_regions
        def triple(self, x):
            return x * 3

    Holder.__module__ = defining.__name__
    defining.double, defining.Holder, importing.double = double, Holder, double
    for module in (defining, importing):
        monkeypatch.setitem(sys.modules, module.__name__, module)

    def calls(module, name):
        return torch.compile(lambda x: getattr(module, name)(x) + 1, backend="eager", fullgraph=True)

    x = torch.ones(3)
    assert torch.equal(calls(importing, "double")(x), x * 2 + 1)  # traced through: no graph break yet
    graph_breaks.apply_graph_breaks()
    holder = Holder()
    for module, name in ((defining, "double"), (importing, "double"), (types.SimpleNamespace(f=holder.triple), "f")):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported):
            calls(module, name)(x)
    assert torch.equal(importing.double(x), x * 2) and torch.equal(holder.triple(x), x * 3)  # eager: unchanged
    late = graph_breaks.eager_in_compiled_regions(lambda x: x - 1)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(lambda x: late(x) + 1, backend="eager", fullgraph=True)(x)


# ---- layouts (multi-process) -----------------------------------------------------------------------------


@pytest.fixture
def composition_backend(monkeypatch):
    monkeypatch.setattr(launch_train, "apply_compile", functools.partial(regional.apply_compile, backend=BACKEND))


LAYOUTS = {
    # DualPipeV: overlapped F&B pairs, deferred weight grads, the V turn; the MTP block on the last stage
    "pp2-dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]),
    # all-to-all dispatch with a different number of received rows every step; ZeRO-1 gathers overlapped
    "dp2-ep2": (2, ["parallel.dp=2", "parallel.ep=2", "train.recompute=true"]),
    # context parallelism: the latents' gather and the blockwise attention run eagerly inside the MLA region
    "cp2": (2, ["parallel.cp=2", "train.recompute=true"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_compiled_matches_eager(tmp_path, counted_steps, composition_backend, layout):
    world, overrides = LAYOUTS[layout]
    eager = train(tmp_path / "eager", world, *overrides)
    compiled = train(tmp_path / "compiled", world, "train.compile=true", *overrides)
    for got, want in zip(compiled, eager, strict=True):  # every rank
        assert_matches(got, want)


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "moe"])
def test_compiled_block_bf16_cuda(dense):
    """A V2-Lite-width block in bf16 on CUDA, compiled by inductor (Triton kernels): forward and backward
    match eager. Every expert is routed (as in test_compiled_bf16_matches_eager), so no routing decision can
    flip; what differs is bf16 rounding between fused ops, a few bf16 ulps (2^-8) of each tensor's scale."""
    args = dataclasses.replace(PRESETS["v2_lite_16b"], n_layers=2, n_dense_layers=1, n_routed_experts=8,
                               n_activated_experts=8, n_expert_groups=1, n_limited_groups=1, max_seq_len=1024)
    device = torch.device("cuda")
    blocks = [Block(args, 0 if dense else 1).to(device) for _ in range(2)]
    torch.manual_seed(0)
    for p, q in zip(blocks[0].parameters(), blocks[1].parameters(), strict=True):
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.02)
            q.copy_(p)
    for b in blocks:
        cast_parameters(b, torch.bfloat16)
    for region in regional.block_regions(blocks[1]):
        regional.compile_region(region)
    cos, sin = (t[:512].to(device) for t in rope_tables(args))
    x = torch.randn(2, 512, args.dim, device=device, dtype=torch.bfloat16)
    results = []
    for block in blocks:
        xi = x.clone().requires_grad_()
        y = block(xi, cos, sin)
        y.float().square().mean().backward()
        results.append((y.float(), xi.grad.float(), {n: p.grad.float() for n, p in block.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert (y1 - y0).abs().max() <= 4 * 2**-8 * y0.abs().max()
    assert (dx1 - dx0).abs().max() <= 4 * 2**-8 * dx0.abs().max()
    assert_close_grads(g1, g0, 8 * 2**-8)
