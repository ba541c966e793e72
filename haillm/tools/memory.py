"""Memory of one rank of a layout, predicted from the code that will allocate it.

The rank's model is built on the meta device exactly as ``launch/train.py`` builds it (its pipeline stages
by ``stage.build_stage_model``, only its experts by ``expert.apply_expert_parallel``, its tensor-parallel
blocks by ``tensor_plan.parallelize_tensor``), its parameters are split into the optimizer's groups
(``optim.zero_groups``, by tensor-parallel placement too) and laid out in ZeRO-1 buckets by the optimizer's
own ``zero_buckets.plan_buckets``, so parameter, gradient and optimizer bytes are those the run allocates.
Activations come from ``activations.chunk_bytes`` per local chunk and micro-batch, weighted by the most
micro-batches the schedule keeps in flight on the rank (``schedules.peak_activations``: PP+1 on DualPipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch

from haillm.fp8.policy import apply_fp8
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.parallel.expert import ExpertPlacement, apply_expert_parallel
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.pipeline.schedules import Schedule, build, peak_activations
from haillm.parallel.pipeline.stage import StageSpec, build_stage_model, second_copies, stage_specs
from haillm.parallel.tensor import TensorParallel
from haillm.parallel.tensor_plan import parallelize_tensor
from haillm.parallel.zero import DEFAULT_BUCKET_MB
from haillm.parallel.zero_buckets import FP32_BYTES, BucketPlan, ParamSpec, plan_buckets
from haillm.tools.activations import ActivationSetup, chunk_bytes
from haillm.train.optim import replica_dim, zero_groups


@dataclass(frozen=True)
class Layout:
    """What the memory of a rank depends on besides the model."""

    dp: int
    pp: int
    ep: int
    schedule: str
    ranks_per_node: int
    micro_batch: int
    seq_len: int
    n_microbatches: int  # per data-parallel rank and step
    param_dtype: torch.dtype
    moment_dtype: torch.dtype
    reduce_dtype: torch.dtype  # optim.grad_reduce_dtype
    setup: ActivationSetup
    bucket_mb: float = DEFAULT_BUCKET_MB  # optim.bucket_mb
    fp8_cache_transposed: bool = False  # fp8.cache_transposed
    tp: int = 1
    sequence_parallel: bool = False  # parallel.sequence_parallel (with tp > 1)
    cp: int = 1

    @property
    def seq_factor(self) -> int:
        """How many times longer a sequence is than the hidden states between stages: the cp ranks' chunks,
        sequence shards of those under sequence parallelism."""
        return (self.tp if self.sequence_parallel else 1) * self.cp

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.cp * self.tp


@dataclass
class RankMemory:
    """Bytes one rank holds (``pp_rank``; every data-parallel and expert-parallel rank of it alike).

    Two peaks: during forward and backward, the static state plus the activations in flight; at the end of
    the step, with the activations freed, the static state plus the larger of two transient copies made one
    after the other: ``sum_partner_grads``' flat fp32 gradients, then the low-precision bucket copies a
    ``grad_reduce_dtype=bf16`` reduction keeps until ``finish_grad_sync``. (Without a pipeline the copies
    are made in the last backward, as its activations are freed: one layer's overlap is not counted.)"""

    pp_rank: int
    parameters: int
    gradients: int
    optimizer: int
    fp8_weight_cache: int
    activations: float
    activations_per_microbatch: list[float]  # per local chunk
    partner_grads: int  # transient: the fp32 buffer sum_partner_grads all-reduces with the partner rank
    reduce_copies: int  # transient: gradient buckets copied to optim.grad_reduce_dtype for their reduction
    specs: list[StageSpec] = field(repr=False)  # the local chunks
    plans: list[BucketPlan] = field(repr=False)  # the ZeRO-1 buckets
    replicas: list[str] = field(repr=False)  # per param group (BucketPlan.group): its ParallelDims replica dim

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.fp8_weight_cache

    @property
    def end_of_step(self) -> int:
        return self.static + max(self.partner_grads, self.reduce_copies)

    @property
    def total(self) -> float:
        return max(self.static + self.activations, self.end_of_step)

    def as_dict(self) -> dict:
        skip = ("specs", "plans", "replicas")
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip},
                "buckets": len(self.plans), "static": self.static, "end_of_step": self.end_of_step,
                "total": self.total}


def dims_of(lay: Layout, pp_rank: int) -> ParallelDims:
    """The rank arithmetic of data- and tensor-parallel rank 0 of pipeline rank ``pp_rank`` (no process groups)."""
    return ParallelDims(lay.dp, lay.pp, lay.tp, lay.ep, lay.world, lay.ranks_per_node,
                        rank=pp_rank * lay.dp * lay.cp * lay.tp, cp=lay.cp)


def rank_model(args: ModelArgs, lay: Layout, pp_rank: int) -> torch.nn.Module:
    """This pipeline rank's model on the meta device, holding the experts of expert-parallel rank 0 (every
    ep rank holds as many) and the blocks of tensor-parallel rank 0 (tp splits evenly), with its
    ``tp_placements``."""
    with torch.device("meta"):
        if lay.pp > 1:
            model = build_stage_model(args, lay.schedule, lay.pp, pp_rank, init_seed=None)
        else:
            model = DeepSeekV3(args, init_seed=None)
    if lay.ep > 1:
        placement = ExpertPlacement.from_dims(dims_of(lay, pp_rank), args.n_routed_experts, args.n_expert_groups)
        apply_expert_parallel(model, SimpleNamespace(placement=placement))  # only its placement is read
    parallelize_tensor(model, TensorParallel(None, lay.tp, 0, lay.sequence_parallel))  # no group: the split only
    return model


def bucket_plans(model: torch.nn.Module, lay: Layout, pp_rank: int) -> tuple[list[BucketPlan], list[str]]:
    """The ZeRO-1 buckets ``build_optimizer`` makes for this rank, from its own rules: the param groups
    (``zero_groups``, second copies by ``second_copies``, tp placements by ``model.tp_placements``) and each
    group's replicas (``replica_dim``, also returned per group)."""
    dims = dims_of(lay, pp_rank)
    specs = [(n, ParamSpec(n, tuple(p.shape), lay.param_dtype)) for n, p in model.named_parameters()]
    groups = zero_groups(specs, lay.ep, second_copies(model, lay.schedule, lay.pp, pp_rank), model.tp_placements)
    replicas = [replica_dim(expert, kind) for (expert, _, kind), _ in groups]
    worlds = [getattr(dims, r) for r in replicas]
    return plan_buckets([[s for _, s in g] for _, g in groups], worlds, int(lay.bucket_mb * 2**20)), replicas


def partner_grad_bytes(model: torch.nn.Module, lay: Layout) -> int:
    """The flat buffer ``sum_partner_grads`` builds and all-reduces: the fp32 ``main_grad`` of every partner
    parameter (``StageModel.partner_params``)."""
    if lay.pp == 1:
        return 0
    return sum(p.numel() for _, p in model.partner_params(lay.schedule)) * FP32_BYTES


def fp8_weight_cache_bytes(model: torch.nn.Module, only: set[str] | None = None, transposed: bool = False) -> int:
    """The FP8 copies of the weights FP8 linears and routed experts quantize once per step (E4M3 plus 128x128
    block scales); ``only``: of the linears with these report names. With ``fp8.cache_transposed`` each also
    caches the transposed copy Dgrad reads (``transposed``; without it backward makes one weight's at a time,
    a transient the planner leaves out like the other per-layer temporaries)."""
    report = apply_fp8(model, True)
    total = 0
    for name in report.low if only is None else [n for n in report.low if n in only]:
        out_f, in_f = report.shapes[name]
        copies = 2 if transposed else 1
        total += copies * (out_f * in_f + 4 * math.ceil(out_f / 128) * math.ceil(in_f / 128))
    return total


def rank_memory(args: ModelArgs, lay: Layout, pp_rank: int, model: torch.nn.Module | None = None,
                schedule: Schedule | None = None) -> RankMemory:
    """Memory of pipeline rank ``pp_rank``; ``model``: its ``rank_model`` if already built; ``schedule``: the
    layout's ``schedules.build`` if already built."""
    model = model if model is not None else rank_model(args, lay, pp_rank)
    plans, replicas = bucket_plans(model, lay, pp_rank)
    if lay.pp > 1:
        specs = stage_specs(args, lay.schedule, lay.pp, pp_rank)
    else:
        specs = [StageSpec(0, range(args.n_layers), first=True, last=True)]
    per_mb = [chunk_bytes(args, s, lay.micro_batch, lay.seq_len, lay.setup, shared_embedding=lay.pp == 1)
              for s in specs]
    if lay.pp > 1:
        schedule = schedule or build(lay.schedule, lay.pp, lay.n_microbatches)[0]
        activations = peak_activations(schedule[pp_rank], per_mb)
    else:
        activations = per_mb[0]  # micro-batches run one after the other
    return RankMemory(
        pp_rank=pp_rank,
        parameters=sum(b.param_bytes() for b in plans),
        gradients=sum(b.grad_bytes() for b in plans),
        optimizer=sum(b.state_bytes(lay.moment_dtype) for b in plans),
        fp8_weight_cache=fp8_weight_cache_bytes(model, transposed=lay.fp8_cache_transposed) if lay.setup.fp8 else 0,
        activations=activations,
        activations_per_microbatch=per_mb,
        partner_grads=partner_grad_bytes(model, lay),
        reduce_copies=sum(b.reduce_copy_bytes(lay.reduce_dtype) for b in plans),
        specs=specs,
        plans=plans,
        replicas=replicas,
    )


def all_ranks(args: ModelArgs, lay: Layout, schedule: Schedule | None = None) -> list[RankMemory]:
    """One entry per pipeline rank (the data- and expert-parallel ranks of a stage hold the same amounts).
    Ranks that hold the same stages (DualPipe's mirror pairs) share one model build, and all one schedule
    (``schedule``: the layout's ``schedules.build`` if already built)."""
    models: dict[tuple[int, ...], torch.nn.Module] = {}
    if lay.pp > 1 and schedule is None:
        schedule = build(lay.schedule, lay.pp, lay.n_microbatches)[0]
    out = []
    for r in range(lay.pp):
        key = tuple(sorted(s.index for s in stage_specs(args, lay.schedule, lay.pp, r))) if lay.pp > 1 else ()
        if key not in models:
            models[key] = rank_model(args, lay, r)
        out.append(rank_memory(args, lay, r, models[key], schedule))
    return out
