"""Global expert identities of the stacked routed experts: per-expert state-dict keys (views into the stacks),
loading them back, per-FQN initialisation of each row, building an expert-parallel block on the meta device,
ZeRO-1 state checkpointed in per-expert pieces, and a checkpoint written under one expert layout read under
others (model and optimizer state, exactly)."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist import run_distributed
from test_train import launch_train

from haillm.config import compose_config
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.models.deepseek_v3.experts import WEIGHTS
from haillm.models.deepseek_v3.model import param_seed
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.zero import ZeroAdamW
from haillm.parallel.zero_state import _pieces
from haillm.train import checkpoint
from haillm.train.ema import ParameterEMA
from haillm.train.optim import build_optimizer

ARGS = get_preset("tiny")


def per_expert_keys(prefix: str, ids) -> list[str]:
    """The keys the per-expert ``MLP`` modules had: expert by expert, w1, w2, w3."""
    return [f"{prefix}.{gid}.{w}.weight" for gid in ids for w in WEIGHTS]


def test_state_dict_names_each_expert_by_global_id_and_views_the_stacks():
    model = DeepSeekV3(ARGS, init_seed=0)
    state = model.state_dict()
    keys = [k for k in state if ".experts." in k and k.startswith("layers.1.")]
    assert keys == per_expert_keys("layers.1.ffn.experts", range(ARGS.n_routed_experts))
    assert "layers.1.ffn.experts.w1" not in state
    assert state["layers.1.ffn.experts.5.w2.weight"].shape == (ARGS.dim, ARGS.moe_inter_dim)
    state["layers.1.ffn.experts.5.w1.weight"].fill_(3.0)  # in-place loads (DCP, HF import) reach the stack
    assert (model.layers["1"].ffn.experts.w1[5] == 3.0).all()

    other = DeepSeekV3(ARGS, init_seed=1)
    other.load_state_dict(state)  # per-expert keys are stacked back
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    del state["layers.1.ffn.experts.7.w3.weight"]
    with pytest.raises(RuntimeError, match="layers.1.ffn.experts.w3"):
        other.load_state_dict(state)


def test_each_row_is_initialised_from_its_per_expert_fqn():
    model = DeepSeekV3(ARGS, init_seed=7)
    fqn = "layers.2.ffn.experts.6.w2.weight"
    gen = torch.Generator().manual_seed(param_seed(7, fqn))
    expected = torch.empty(ARGS.dim, ARGS.moe_inter_dim).normal_(0.0, ARGS.init_std, generator=gen)
    assert torch.equal(model.layers["2"].ffn.experts.w2[6], expected)


def test_an_expert_block_is_built_on_the_meta_device_and_keeps_its_values():
    with torch.device("meta"):
        model = DeepSeekV3(ARGS, init_seed=None)
    experts = model.layers["1"].ffn.experts
    experts.keep(range(4, 6))
    assert experts.w1.shape == (2, ARGS.moe_inter_dim, ARGS.dim) and experts.w1.is_meta
    model.to_empty(device="cpu")
    model.init_weights(0)
    full = DeepSeekV3(ARGS, init_seed=0).state_dict()
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    assert per_expert_keys("layers.1.ffn.experts", [4, 5]) == [k for k in model.state_dict() if "layers.1.ffn.ex" in k]
    with pytest.raises(ValueError, match=r"experts \[0\] are not held here"):
        experts.keep([0, 4])
    del experts["4"]
    assert experts.ids == [5] and torch.equal(experts.w3[0], full["layers.1.ffn.experts.5.w3.weight"])


def test_zero_state_in_pieces_is_the_unsplit_state_row_by_row():
    """A generic ``state_pieces`` hook: one [3, 4, 5] parameter checkpointed as three named rows."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(3, 4, 5))

    def rows(name, p):
        return [(f"row{r}", r * 20, torch.Size([4, 5])) for r in range(3)] if name == "stack" else [(name, 0, p.shape)]

    optimizers = []
    for pieces in (None, rows):
        p = make()
        opt = ZeroAdamW([("stack", p)], lr=0.1, state_pieces=pieces)
        (p.square() * torch.arange(1.0, 4.0).view(3, 1, 1)).sum().backward()
        opt.step()
        optimizers.append(opt)
    whole, split = (opt.state_dict()["state"] for opt in optimizers)
    assert split.keys() == {"row0", "row1", "row2"}
    for r in range(3):
        for kind, value in split[f"row{r}"].items():
            assert torch.equal(value, whole["stack"][kind][r]), (r, kind)
    saved = {name: {kind: v.clone() for kind, v in kinds.items()} for name, kinds in split.items()}
    saved["row1"]["exp_avg"].fill_(0.5)
    optimizers[1].load_state_dict({"step": torch.tensor(1), "state": saved})
    assert (optimizers[1]._buckets[0].state["exp_avg"][20:40] == 0.5).all()


# ---- a checkpoint read under other expert layouts (forked gloo ranks) --------------------------------------


def build(dp: int, ep: int) -> tuple[torch.nn.Module, ZeroAdamW]:
    """What the trainer builds for dp x ep (meta device, this rank's experts only, then ZeRO-1)."""
    cfg = compose_config([f"parallel.dp={dp}", f"parallel.ep={ep}"])
    dims = ParallelDims.from_config(cfg.parallel, dp).build("cpu")
    model, _ = launch_train.build_model(cfg, dims, torch.device("cpu"))
    return model, build_optimizer(model, cfg, dims)


def local_state(model: torch.nn.Module, opt: ZeroAdamW, ema: ParameterEMA) -> dict:
    """This rank's pieces of every model, optimizer and EMA tensor, keyed by (checkpoint name, offsets)."""
    pieces = {("model", k, (0,) * v.ndim): v.clone() for k, v in model.state_dict().items()}
    pieces |= {("ema", k, (0,) * v.ndim): v.clone() for k, v in ema.state_dict().items()}
    for name, kinds in opt.state_dict()["state"].items():
        for kind, t in kinds.items():
            pieces |= {(f"optim.{kind}", name, off): v.clone() for off, v in _pieces(t).items()}
    return pieces


def _save_worker(path: str, ep: int) -> dict:
    model, opt = build(dist.get_world_size(), ep)
    ema = ParameterEMA(model, 0.5)
    rank = dist.get_rank()
    batch = torch.randint(0, model.args.vocab_size, (4, 17), generator=torch.Generator().manual_seed(rank))
    model.compute_loss(batch)["loss"].backward()
    opt.step()
    ema.update()
    checkpoint.save(path, 1, model, opt, {"step": 1}, keep=0, ema=ema)
    return local_state(model, opt, ema)


def _load_worker(path: str, ep: int) -> dict:
    model, opt = build(dist.get_world_size() if dist.is_initialized() else 1, ep)
    ema = ParameterEMA(model, 0.5)
    checkpoint.load(checkpoint.list_checkpoints(path)[0][1], model, opt, ema=ema)
    assert opt.step_count == 1 and ema.restored
    return local_state(model, opt, ema)


def assert_pieces_of(pieces: dict, full: dict) -> int:
    """Every piece equals the matching slice of the single-process (unsharded) state ``full``."""
    for (kind, name, offsets), value in pieces.items():
        whole = full[(kind, name, (0,) * value.ndim)]
        box = tuple(slice(o, o + n) for o, n in zip(offsets, value.shape, strict=True))
        assert torch.equal(value, whole[box]), (kind, name, offsets)
    return len(pieces)


def test_checkpoint_reshards_across_expert_layouts(tmp_path):
    """Written at dp=2 x ep=2; read at dp=1 (every expert on one rank) and at dp=4 x ep=2 (each expert's
    state sharded over two expert-data-parallel ranks): every piece of the model, of the optimizer state and of
    the EMA of the parameters is what the writers held, under per-expert names."""
    path = str(tmp_path / "run")
    written = run_distributed(_save_worker, world_size=2, args=(path, 2))
    meta = dcp.FileSystemReader(str(tmp_path / "run/checkpoints/step_1")).read_metadata()
    names = meta.state_dict_metadata
    assert tuple(names["optim.state.layers.1.ffn.experts.6.w2.weight.exp_avg"].size) == (ARGS.dim, ARGS.moe_inter_dim)
    assert "model.layers.1.ffn.experts.6.w2.weight" in names and not any(".experts.w" in n for n in names)
    assert "ema.layers.1.ffn.experts.6.w2.weight" in names and "ema.layers.1.ffn.gate.bias" not in names

    full = _load_worker(path, 1)  # one process holds everything, unsharded
    assert all(assert_pieces_of(w, full) for w in written)
    expert_keys = {k for k in full if ".experts." in k[1]}
    assert expert_keys == {k for w in written for k in w if ".experts." in k[1]}  # each written by its rank
    for got in run_distributed(_load_worker, world_size=4, args=(path, 2)):
        assert assert_pieces_of(got, full)
