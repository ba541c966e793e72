"""Checkpoints independent of tensor parallelism: a tp=2 x dp=2 run saves every tensor -- split parameters, their
ZeRO-1 state (flat shards of each tp block, placed in the whole tensor) and their EMA -- in its whole (tp=1) shape,
synchronously and asynchronously alike; one process reads it whole (checkpoint.load at tp=1 and
haillm.tools.export.load_checkpoint_model), and tp=2 at dp=1 reads it back: every piece is exactly what the writers
held. The geometry on its own: ZeRO shards that cut a column block mid-row. Training runs resumed across tp are in
tests/test_reshard.py."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist import run_distributed
from omegaconf import OmegaConf
from test_experts_checkpoint import assert_pieces_of
from test_train import launch_train
from torch import nn

from haillm.config import compose_config
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.tensor_plan import tp_blocks
from haillm.parallel.zero import ZeroAdamW
from haillm.parallel.zero_state import Block, _pieces, in_blocks
from haillm.tools.export import load_checkpoint_model
from haillm.train import checkpoint
from haillm.train.ema import ParameterEMA
from haillm.train.optim import build_optimizer


def build(tp: int, dp: int) -> tuple[torch.nn.Module, ZeroAdamW, ParameterEMA, str]:
    """What the trainer builds for tp x dp, with an EMA of the parameters; and the config as checkpoints store it."""
    cfg = compose_config([f"parallel.tp={tp}", f"parallel.dp={dp}"])
    dims = ParallelDims.from_config(cfg.parallel, tp * dp).build("cpu")
    model, _ = launch_train.build_model(cfg, dims, torch.device("cpu"))
    return model, build_optimizer(model, cfg, dims), ParameterEMA(model, 0.5), OmegaConf.to_yaml(cfg, resolve=True)


def local_state(model: torch.nn.Module, opt: ZeroAdamW, ema: ParameterEMA) -> dict:
    """This rank's pieces of every model, optimizer and EMA tensor in whole-tensor coordinates, keyed by
    (checkpoint name, offsets)."""
    blocks = tp_blocks(model)
    state = {"model": in_blocks(model.state_dict(), blocks), "ema": ema.state_dict(blocks)}
    state |= {f"optim.{kind}": {name: kinds[kind] for name, kinds in opt.state_dict(blocks)["state"].items()}
              for kind in ("master", "exp_avg", "exp_avg_sq")}
    return {(kind, name, offsets): piece.clone() for kind, tensors in state.items()
            for name, t in tensors.items() for offsets, piece in _pieces(t).items()}


def _save_worker(run: str) -> dict:
    """One step at tp=2 x dp=2, then the same state saved synchronously (step 1) and asynchronously (step 2)."""
    model, opt, ema, config = build(2, 2)
    batch = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    model.compute_loss(batch)["loss"].backward()
    opt.step()
    ema.update()
    checkpoint.save(Path(run), 1, model, opt, {"step": 1}, keep=0, config=config, ema=ema)
    writer = checkpoint.Checkpointer(Path(run), keep=0, async_save=True, config=config)
    writer.save(2, model, opt, {"step": 2}, ema=ema)
    writer.wait()
    return local_state(model, opt, ema)


def _load_worker(path: str, tp: int) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    model, opt, ema, _ = build(tp, world // tp)
    checkpoint.load(Path(path), model, opt, rng=False, ema=ema)
    assert opt.step_count == 1 and ema.restored
    return local_state(model, opt, ema)


def test_tp_checkpoint_holds_whole_tensors_and_reshards(tmp_path):
    run = tmp_path / "run"
    written = run_distributed(_save_worker, world_size=4, args=(str(run),))
    sync, async_ = run / "checkpoints" / "step_1", run / "checkpoints" / "step_2"
    full = _load_worker(str(async_), 1)  # one process at tp=1 holds everything, whole
    meta = dcp.FileSystemReader(str(sync)).read_metadata().state_dict_metadata
    for name in ("layers.0.attn.wq_b.weight", "layers.0.ffn.w2.weight", "embed.weight", "head.weight"):  # split
        whole = tuple(full[("model", name, (0, 0))].shape)
        for key in (f"model.{name}", f"ema.{name}", f"optim.state.{name}.master", f"optim.state.{name}.exp_avg"):
            assert tuple(meta[key].size) == whole, key
    assert all(assert_pieces_of(w, full) for w in written)  # what each tp x dp rank held, in its place
    for got in run_distributed(_load_worker, world_size=2, args=(str(sync), 2)):  # tp=2 at dp=1, from the sync save
        assert assert_pieces_of(got, full)
    for path, ema in ((sync, False), (async_, True)):  # the run's parameters (fp32 masters), or their EMA
        exported = load_checkpoint_model(path, ema=ema).state_dict()
        wanted = {name: v for (kind, name, _), v in full.items() if kind == ("ema" if ema else "model")}
        assert all(torch.equal(exported[name], v) for name, v in wanted.items())


WHOLE = {"a": (6, 10), "b": (4, 6)}  # split along dim 1 over tp=2; b, then a, in one bucket of 42 = 2 x 21 elements


def _whole(name: str) -> torch.Tensor:
    shape = WHOLE[name]
    return torch.arange(float(shape[0] * shape[1])).view(shape) + 100 * (name == "b")


def _column_blocks_worker(path: str) -> None:
    """Ranks 2 dp + tp: ZeroAdamW over dp of each rank's column block; exp_avg = 2 x master, saved with blocks."""
    rank = dist.get_rank()
    tp, dp = rank % 2, rank // 2
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    params = [(name, nn.Parameter(_whole(name).chunk(2, 1)[tp].clone())) for name in WHOLE]
    opt = ZeroAdamW(params, process_group=dp_groups[tp])
    for b in opt._buckets:
        b.state["exp_avg"].copy_(b.state["master"] * 2)
    peers = tuple(dist.get_process_group_ranks(tp_groups[dp]))
    dcp.save({"optim": opt.state_dict({name: Block(1, tp, peers) for name in WHOLE})}, checkpoint_id=path)


def test_zero_shards_of_column_blocks_are_saved_whole(tmp_path):
    run_distributed(_column_blocks_worker, world_size=4, args=(str(tmp_path),))
    state = {name: {kind: torch.empty(shape) for kind in ("master", "exp_avg")} for name, shape in WHOLE.items()}
    dcp.load({"optim": {"state": state}}, checkpoint_id=str(tmp_path), no_dist=True)
    for name in WHOLE:
        assert torch.equal(state[name]["master"], _whole(name)), name
        assert torch.equal(state[name]["exp_avg"], 2 * _whole(name)), name
