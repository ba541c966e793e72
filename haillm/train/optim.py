"""The optimizer (ZeRO-1 AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from haillm.config import ConfigError
from haillm.models.deepseek_v3.experts import per_expert_state
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.tensor_plan import TpPlacement
from haillm.parallel.zero import ZeroAdamW

T = TypeVar("T")


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (stacked `...ffn.experts.w1`; `...ffn.experts.<global id>...` in checkpoints),
    sharded over the expert-parallel group."""
    return ".experts." in name


TP_KINDS = ("whole", "partial", "split")  # how a parameter lies over tp (haillm.parallel.tensor_plan.TpPlacement)


def tp_kind(name: str, placements: Mapping[str, TpPlacement] | None) -> str:
    """``split`` over tp (each rank holds a block), ``partial`` (replicated, each rank's gradient a part of the
    sum), or ``whole`` (replicated with the whole gradient on every rank; every parameter at tp=1)."""
    placement = None if placements is None else placements.get(name)
    if placement is None:
        return "whole"
    return "split" if placement.shard_dim is not None else "partial" if placement.partial_grad else "whole"


def zero_groups(named: Iterable[tuple[str, T]], ep: int, outside_norm: Collection[str] = frozenset(),
                placements: Mapping[str, TpPlacement] | None = None
                ) -> list[tuple[tuple[bool, bool, str], list[tuple[str, T]]]]:
    """The optimizer's param groups, keyed (routed expert under EP, outside the gradient norm, ``tp_kind``), in
    a fixed order; also used by the layout planner (haillm.tools.plan) to predict the ZeRO-1 buckets."""
    groups: dict[tuple[bool, bool, str], list[tuple[str, T]]] = {}
    for name, item in named:
        key = (ep > 1 and is_expert_param(name), name in outside_norm, tp_kind(name, placements))
        groups.setdefault(key, []).append((name, item))
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], TP_KINDS.index(kv[0][2])))


def config_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's ``fp32`` / ``bf16`` (``optim.moment_dtype``, ``optim.grad_reduce_dtype``)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def replica_dim(expert: bool, kind: str = "whole") -> str:
    """The ``ParallelDims`` dimension a param group's gradients are summed over, and its ZeRO-1 state sharded
    over: routed experts under EP over the expert-data-parallel group (edp = dp/ep: each ep rank holds
    different experts), everything else over dp; both with the context-parallel ranks (same parameters,
    other tokens); a ``partial`` group over tp too (``tp_kind``). One rule for the optimizer and the layout
    planner."""
    base = "edp_cp" if expert else "dp_cp"
    return f"{base}_tp" if kind == "partial" else base


def build_optimizer(model: torch.nn.Module, cfg: DictConfig, dims: ParallelDims,
                    outside_norm: set[str] = frozenset()) -> ZeroAdamW:
    """ZeRO-1 AdamW: one code path for every layout (dp=1 communicates nothing).

    Dense parameters are replicated over dp; with expert parallelism each rank's experts are replicated
    over the expert-data-parallel group (edp = dp/ep) and their state is sharded over it, while the
    gradient norm also sums over ep (each ep rank holds different experts) and over pp (each stage holds
    different layers). Under tensor parallelism (``model.tp_placements``) a split parameter's norm also sums
    over tp, and a replicated one whose gradient each tp rank holds a part of is summed over tp with dp.
    Parameters named in `outside_norm` are second copies that another pipeline rank already counts. Build it
    after the weights are final and on their device: parameters become views into its buckets. No weight
    decay on 1-D parameters.
    """
    o = cfg.optim
    param_groups = []
    placements = getattr(model, "tp_placements", None)
    for (expert, outside, kind), params in zero_groups(model.named_parameters(), dims.ep, outside_norm, placements):
        replicas = dims.group(replica_dim(expert, kind))
        norm_groups = ((dims.ep_group,) if expert else ()) + ((dims.tp_group,) if kind == "split" else ())
        group = {"params": params, "in_norm": not outside, "process_group": replicas, "norm_groups": norm_groups}
        if expert or kind == "partial":  # the sum holds more than one data-parallel rank's share per replica
            group["grad_divisor"] = dims.dp_cp
        param_groups.append(group)
    return ZeroAdamW(
        param_groups, lr=cfg.train.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
        process_group=dims.group("dp_cp"), norm_groups=(dims.pp_group,) if dims.pp > 1 else (),
        moment_dtype=config_dtype(o.moment_dtype),
        reduce_dtype=config_dtype(o.grad_reduce_dtype), bucket_mb=o.bucket_mb,
        state_pieces=per_expert_state(model),
    )


SCHEDULE_KEYS = ("train.lr", "train.steps", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio",
                 "optim.decay_start")
ON_SCHEDULE_CHANGE = ("refuse", "continue", "restart")


def schedule_of(cfg: DictConfig) -> dict:
    """The settings the learning rate of every step depends on (saved in checkpoints, compared on resume): a
    constant schedule does not depend on the run's length, nor a cosine on `decay_start`."""
    relevant = {"constant": ("train.lr", "optim.schedule", "optim.warmup_steps"),
                "cosine": ("train.lr", "train.steps", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio")
                }.get(cfg.optim.schedule, SCHEDULE_KEYS)
    return {key: OmegaConf.select(cfg, key) for key in relevant}


def lr_at(step: int, cfg: DictConfig, origin: dict | None = None) -> float:
    """LR for 1-based optimizer step `step`: linear warmup, then cosine (or constant, then cosine) to the floor.

    `constant_then_decay` is DeepSeek-V3's shape: hold the peak until `decay_start` of the run, then a
    cosine down to `min_lr_ratio * lr` at the last step. `origin` (``resume_origin``) moves the start of the
    schedule to a resumed step whose schedule changed: "restart" runs the schedule, warmup included, over the
    remaining steps; "continue" runs it from the resumed learning rate, without warmup, down to the floor.
    """
    o, t = cfg.optim, cfg.train
    floor = t.lr * o.min_lr_ratio
    if origin is None:
        return _shaped(step, t.lr, t.steps, o.warmup_steps, floor, o.schedule, o.decay_start)
    start = origin["step"]
    if origin["mode"] == "restart":
        return _shaped(step - start, t.lr, t.steps - start, o.warmup_steps, floor, o.schedule, o.decay_start)
    lr = origin["lr"]
    return _shaped(step - start, lr, t.steps - start, 0, min(floor, lr), o.schedule, o.decay_start)


def _shaped(step: int, peak: float, total: int, warmup: int, floor: float, schedule: str, decay_start: float
            ) -> float:
    if warmup and step <= warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    start = warmup if schedule == "cosine" else max(warmup, int(decay_start * total))
    if step <= start:
        return peak
    progress = min(1.0, (step - start) / max(1, total - start))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resume_origin(saved: dict, cfg: DictConfig) -> dict | None:
    """Where the learning-rate schedule starts for a run resumed from trainer state `saved`.

    Unchanged settings, new ones that give the resumed step the learning rate it had (a run extended during
    its warmup or its constant phase), or new ones whose next step goes no higher (a run cut short decays
    sooner): the saved origin, and the new schedule follows. Otherwise the rate would jump up at the resume (a
    cosine recomputed over more steps climbs back from its floor), and `optim.on_schedule_change` decides:
    ConfigError ("refuse"), or a new origin."""
    before, now = saved.get("schedule"), schedule_of(cfg)
    origin, step = saved.get("lr_origin"), saved["step"]
    if before is None or before == now or not step:  # checkpoints from before schedules were saved: unchanged
        return origin
    old = OmegaConf.create({"train": dict(cfg.train), "optim": dict(cfg.optim)})  # what `before` leaves out is unused
    for key, value in before.items():
        OmegaConf.update(old, key, value)
    lr, following = lr_at(step, old, origin), lr_at(step + 1, cfg, origin)
    if math.isclose(lr_at(step, cfg, origin), lr, rel_tol=1e-9) or following <= lr * (1 + 1e-9):
        return origin
    mode = cfg.optim.on_schedule_change
    if mode == "refuse":
        changed = ", ".join(f"{key} {before.get(key)} -> {now.get(key)}" for key in SCHEDULE_KEYS
                            if before.get(key) != now.get(key))
        raise ConfigError(f"the learning-rate schedule changed since the checkpoint of step {step} ({changed}) and "
                          f"would jump from {lr:.3g} up to {following:.3g}; "
                          f"optim.on_schedule_change=continue goes on from {lr:.3g}, =restart starts the new schedule "
                          "over from there, =refuse (the default) stops")
    return {"mode": mode, "step": step, "lr": lr}
