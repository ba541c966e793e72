"""Cutting DeepSeek-V3 into pipeline stages, and the gradient sums that duplicated parameters need.

A stage is a contiguous range of transformer layers; the first stage also embeds the tokens, the last one
also runs the final norm, the head and the MTP modules and computes the objective. Ranges are balanced by
an approximate per-token cost (activated matmul parameters: dense layers cost more than MoE layers here,
the head and MTP weigh on the last stage).

One rank holds all its chunks (one for 1F1B, two for DualPipe and DualPipeV) in a single ``StageModel``
whose parameter names are the full model's FQNs (``embed.weight``, ``layers.7.attn.wkv_a.weight``,
``mtp.0.eh_proj.weight``...), initialised with ``init_weights(seed)`` per FQN: every layout starts from the
same weights, and checkpoints do not depend on the layout. A rank's two chunks never share layers.

Parameters that live on two ranks need their gradients summed before the optimizer step
(:func:`partner_group` + :func:`sum_partner_grads`):

- DualPipe: rank r and rank pp-1-r hold the same two stages (r and pp-1-r), each seeing one direction's
  micro-batches: all their gradients are summed. Their MoE load counters must be summed the same way
  before a bias update (``dist.all_reduce(model.moe_loads(), group=partner)``, or fold the partner into
  the data-parallel reduction of the loads).
- 1F1B with MTP: the last rank keeps its own copy of the embedding for the MTP inputs; its gradient is
  summed with the first rank's embedding gradient.
- DualPipeV (and DualPipe's shared embedding/head on one rank): nothing to sum; the first and the last
  stage are on rank 0, so the embedding and the head are the same parameters there.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from haillm.models.deepseek_v3.args import ModelArgs
from haillm.models.deepseek_v3.balance import take_balance_loss
from haillm.models.deepseek_v3.flops import block_params
from haillm.models.deepseek_v3.mla import rope_tables
from haillm.models.deepseek_v3.model import Block, TrainingObjective, moe_layers_of
from haillm.models.deepseek_v3.moe import GraphCut
from haillm.models.deepseek_v3.mtp import MTPModule
from haillm.ops import Linear, RMSNorm, set_weight_grad_deferral
from haillm.ops.recompute import stepwise
from haillm.parallel.pipeline.overlap import run_to_end
from haillm.parallel.pipeline.runtime import ChunkOutput
from haillm.parallel.pipeline.schedules import SCHEDULES, topology

METRIC_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")


def layer_costs(args: ModelArgs) -> tuple[list[int], int]:
    """Approximate per-token cost of each layer and the extra cost of the last stage (head, MTP)."""
    layers = [block_params(args, dense=i < args.n_dense_layers)[1] for i in range(args.n_layers)]
    head = args.vocab_size * args.dim
    mtp = 2 * args.dim * args.dim + block_params(args, dense=False)[1] + head
    return layers, head + args.mtp_depth * mtp


def split_layers(args: ModelArgs, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the most expensive stage."""
    n = args.n_layers
    if n_stages > n:
        raise ValueError(f"{n_stages} pipeline stages but model.n_layers={n}: each stage needs at least one layer")
    costs, last_extra = layer_costs(args)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def segment(i: int, j: int) -> int:
        return prefix[j] - prefix[i] + (last_extra if j == n else 0)

    # best[s][j]: the smallest max-stage cost of layers [0, j) cut into s stages; cut[s][j]: the last cut.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], segment(i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [n], n
    for s in range(n_stages, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class StageSpec:
    """One model stage: its index, its layers, and whether it is the first or the last of the model."""

    index: int
    layers: range
    first: bool
    last: bool


def stage_specs(args: ModelArgs, schedule: str, pp: int, pp_rank: int) -> list[StageSpec]:
    """The stages a pipeline rank runs, in the schedule's local chunk order (``schedules.topology``)."""
    topo = topology(schedule, pp)
    SCHEDULES[schedule](pp, 2 * pp)  # the generator's own pp check (2*pp micro-batches suit every schedule)
    ranges = split_layers(args, topo.n_stages)
    specs = []
    for stage in topo.chunks[pp_rank]:
        i = stage.index
        specs.append(StageSpec(i, ranges[i], first=i == 0, last=i == topo.n_stages - 1))
    return specs


class StageModel(TrainingObjective, nn.Module):
    """The DeepSeek-V3 stages of one pipeline rank, under the full model's parameter names.

    ``forward_chunk(chunk, x, batch)`` runs one local chunk on a micro-batch ``batch: [B, T+1]`` (tokens)
    and returns the hidden state for the next stage, or on the last stage the objective of
    ``DeepSeekV3.compute_loss`` (main CE, MTP, and the balance losses of this stage's MoE layers).
    ``forward_phases`` is the same forward as a generator for the runtime's overlapped F&B pairs: it yields
    while an MoE layer's tokens are in flight (expert parallelism) and cuts the graph there.

    ``recompute`` (``set_recompute``): keep no RMSNorm outputs and no MLA up-projections (q, k, v) for
    backward; they are recomputed from the norms' inputs and the latents (``haillm.ops.recompute``).
    """

    metric_keys = METRIC_KEYS

    def __init__(self, args: ModelArgs, specs: list[StageSpec], init_seed: int | None = 0,
                 recompute: bool = False) -> None:
        super().__init__()
        self.args = args.validate()
        self.specs = specs
        self.has_first, self.has_last = any(s.first for s in specs), any(s.last for s in specs)
        layer_ids = sorted(i for s in specs for i in s.layers)
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError("the stages of one rank must not share layers")
        if self.has_first or (self.has_last and args.mtp_depth):
            self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in layer_ids})
        if self.has_last:
            self.norm = RMSNorm(args.dim, args.rms_norm_eps)
            self.head = Linear(args.dim, args.vocab_size)
            self.mtp = nn.ModuleDict(
                {str(k): MTPModule(args, Block(args, args.n_layers + k)) for k in range(args.mtp_depth)}
            )
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init_seed is not None:
            self.init_weights(init_seed)
        self.set_recompute(recompute)

    def activation_shape(self, batch: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        """The hidden state travels in the parameters' dtype (the compute dtype: fp32, or bf16 in mixed
        precision), the same on every rank; under sequence parallelism each tp rank sends its shard."""
        dtype = next(self.parameters()).dtype
        return (batch.shape[0], (batch.shape[1] - 1) // (self.tp.seq_factor * self.cp.size), self.args.dim), dtype

    def forward_chunk(self, chunk: int, x: torch.Tensor | None, batch: torch.Tensor) -> ChunkOutput:
        return run_to_end(self.forward_phases(chunk, x, batch, None))

    def forward_phases(self, chunk: int, x: torch.Tensor | None, batch: torch.Tensor, cut: GraphCut | None
                       ) -> Generator[None, None, ChunkOutput]:
        """``forward_chunk`` yielding while tokens are in flight, graph cut by ``cut`` (never yields without)."""
        return stepwise(self._saving, self._phases(chunk, x, batch, cut))

    def _phases(self, chunk: int, x: torch.Tensor | None, batch: torch.Tensor, cut: GraphCut | None
                ) -> Generator[None, None, ChunkOutput]:
        spec = self.specs[chunk]
        inputs = batch[:, :-1]
        h = self.embed(self.cp.local(inputs)) if spec.first else x
        cos, sin = self.rope_at(inputs.shape[1])
        blocks = [self.layers[str(i)] for i in spec.layers]
        for block in blocks:
            h = yield from block.forward_phases(h, cos, sin, cut)
        if not spec.last:
            balance = take_balance_loss(moe_layers_of(blocks), h)
            zero = h.new_zeros(())
            metrics = {"loss": balance.detach(), "lm_loss": zero, "mtp_loss": zero, "balance_loss": balance.detach()}
            return ChunkOutput(h, balance if balance.requires_grad else None, metrics)
        lm_loss, mtp_loss = yield from self.lm_and_mtp_loss_phases(h, inputs, batch[:, 1:], cut=cut)
        balance = take_balance_loss(moe_layers_of(blocks + [m.block for m in self.mtp.values()]), h)
        loss = lm_loss + mtp_loss + balance
        metrics = {"loss": loss.detach(), "lm_loss": lm_loss.detach(), "mtp_loss": mtp_loss.detach(),
                   "balance_loss": balance.detach()}
        return ChunkOutput(None, loss, metrics)

    def partner_params(self, schedule: str) -> list[tuple[str, nn.Parameter]]:
        """Parameters whose gradients must be summed with the partner rank's (see module docstring)."""
        if schedule == "dualpipe":
            return list(self.named_parameters())
        if schedule == "1f1b" and self.args.mtp_depth and self.has_first != self.has_last:
            return [("embed.weight", self.embed.weight)]  # first or last rank of a pp > 1 pipeline
        return []


def build_stage_model(args: ModelArgs, schedule: str, pp: int, pp_rank: int, init_seed: int | None = 0,
                      recompute: bool = False) -> StageModel:
    """This pipeline rank's ``StageModel`` for ``schedule`` on ``pp`` ranks; weight-gradient deferral is on
    where the schedule has I/W actions and overlapped pairs (DualPipe, DualPipeV)."""
    model = StageModel(args, stage_specs(args, schedule, pp, pp_rank), init_seed, recompute)
    set_weight_grad_deferral(model, schedule != "1f1b")
    return model


# --- gradient sums between ranks holding the same parameters -------------------------------------------


def second_copies(model: nn.Module, schedule: str, pp: int, pp_rank: int) -> set[str]:
    """Names of the partner parameters this rank leaves out of the gradient norm, so that every parameter
    counts once: the second copy is on ranks pp/2 and up (DualPipe's mirrors, 1F1B's last rank's embedding)."""
    if pp == 1 or pp_rank < pp // 2:
        return set()
    return {n for n, _ in model.partner_params(schedule)}


def pipelines_of(dims) -> list[list[int]]:
    """Global ranks of every pipeline (pp group) of a ``ParallelDims``, each ordered by pipeline rank."""
    return [[dims.global_rank(p, dp, tp, cp) for p in range(dims.pp)]
            for dp in range(dims.dp) for cp in range(dims.cp) for tp in range(dims.tp)]


def partner_group(schedule: str, pipelines: list[list[int]], mtp: bool = True,
                  timeout: timedelta | None = None) -> dist.ProcessGroup | None:
    """The 2-rank group this rank sums partner gradients in, or None.

    DualPipe: ranks (r, pp-1-r) of each pipeline; 1F1B with MTP (``mtp``): the first and the last rank.
    Every rank of the default group must call this with the same arguments (group creation is collective).
    """
    pairs = []
    for ranks in pipelines:
        pp = len(ranks)
        if schedule == "dualpipe":
            pairs += [[ranks[r], ranks[pp - 1 - r]] for r in range(pp // 2)]
        elif schedule == "1f1b" and mtp and pp > 1:
            pairs.append([ranks[0], ranks[-1]])
    return own_group(pairs, timeout)


def own_group(rank_lists: list[list[int]], timeout: timedelta | None = None) -> dist.ProcessGroup | None:
    """A new group for each list of ranks, created by every rank (creation is collective); this rank's one, or
    None. `timeout` is the collective timeout (None: the backend's default)."""
    me, mine = dist.get_rank(), None
    for ranks in rank_lists:
        group = dist.new_group(ranks, timeout=timeout)
        if me in ranks:
            mine = group
    return mine


def sum_partner_grads(params: Iterable[tuple[str, torch.Tensor]], group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of ``params`` with the partner rank's in one all-reduce (flattened in FQN order,
    so both ranks line up). A missing gradient counts as zeros; a no-op without a group."""
    if group is None:
        return
    params = sorted(params, key=lambda item: item[0])
    if not params:
        return
    grads = [_gradient(p) for _, p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for (_, p), g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        if getattr(p, "main_grad", None) is not None:
            p.main_grad.copy_(g.view_as(p))
        else:
            p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def _gradient(p: torch.Tensor) -> torch.Tensor:
    """The gradient accumulated so far: the fp32 ``main_grad`` under ZeRO-1 (a bf16 ``.grad`` is already
    folded into it), else ``.grad``, zeros when there is none."""
    if getattr(p, "main_grad", None) is not None:
        return p.main_grad
    return p.grad if p.grad is not None else torch.zeros_like(p)
