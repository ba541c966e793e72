"""Which weights tensor parallelism splits, and how: ``parallelize_tensor(model, tp)`` in place.

torchtitan's and Megatron-Core's split of DeepSeek-V3, applied to a built model (full model or pipeline
stage, parameters still whole and initialised, so every layout starts from the same values):

- MLA: ``wq``/``wq_b`` and ``wkv_b`` column-parallel by heads, ``wo`` row-parallel; ``wq_a``, ``wkv_a``,
  ``q_norm`` and ``kv_norm`` replicated.
- Dense FFN and shared experts: ``w1``/``w3`` column-parallel, ``w2`` row-parallel.
- Router and routed experts: replicated over tp, each rank routing its own rows (``TensorParallel.shard_rows``);
  expert parallelism splits the experts.
- Embedding and output head: vocabulary-parallel (``VocabParallelEmbedding``, ``Linear.vocab_shard``).
- Norms: replicated; with sequence parallelism they run on sequence shards.

The MTP modules run in replicated mode even under sequence parallelism: their sequences are one token
shorter per depth, which a split of the sequence would not fit.

A replicated parameter gets on each rank either the whole gradient (the same everywhere) or a *partial*
one, to be summed over tp (``tp_placements``): every replicated parameter of a sequence-parallel module
(it saw only a shard of the tokens), and in replicated mode those past a region's entry (``q_norm``,
``kv_norm``: each rank's heads) and the router (each rank's rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from haillm.models.deepseek_v3.experts import GroupedExperts
from haillm.models.deepseek_v3.mla import MLA
from haillm.models.deepseek_v3.moe import MLP, MoE
from haillm.ops import Linear
from haillm.ops.linear import VocabShard
from haillm.parallel.mesh import ParallelConfigError
from haillm.parallel.tensor import TensorParallel
from haillm.parallel.zero_state import Block


@dataclass(frozen=True)
class TpPlacement:
    """How a parameter lies over the tp ranks: split along ``shard_dim`` (None: replicated), and for a
    replicated one whether its gradient on each rank is a partial sum."""

    shard_dim: int | None = None
    partial_grad: bool = False


class VocabParallelEmbedding(nn.Embedding):
    """This rank's block of the vocabulary's rows (``vocab_start ..``): ids outside it look up zeros, and the
    partial sums leave the tensor-parallel region (``tp.exit``: the sequence shard under sequence parallelism)."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, tp: TensorParallel) -> None:
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight, _freeze=not weight.requires_grad)
        self.vocab_start, self.tp = vocab_start, tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return self.tp.exit(rows, tokens.dim() - 1)


def check_divisible(args, tp: int) -> None:
    """Refuse, in one line, a model whose heads, FFN widths or vocabulary tp does not split evenly."""
    widths = {"model.n_heads": args.n_heads, "model.vocab_size": args.vocab_size}
    if args.n_dense_layers:
        widths["model.inter_dim"] = args.inter_dim
    if args.n_shared_experts:
        widths["model.n_shared_experts*moe_inter_dim"] = args.n_shared_experts * args.moe_inter_dim
    for key, value in widths.items():
        if value % tp:
            raise ParallelConfigError(
                f"{key}={value} is not divisible by parallel.tp={tp}: tensor parallelism splits it evenly "
                f"(choose tp among the divisors of {value})"
            )


def _split(linear: Linear, dim: int, tp: TensorParallel) -> None:
    """Keep this rank's block of ``linear``'s weight along ``dim`` (0: output rows, 1: input columns)."""
    block = linear.weight.detach().chunk(tp.size, dim)[tp.rank].clone()
    linear.weight = nn.Parameter(block, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = block.shape


def parallelize_tensor(model: nn.Module, tp: TensorParallel) -> dict[str, TpPlacement]:
    """Split ``model``'s weights over ``tp`` in place (see the module docstring) and return every parameter's
    placement by name, also kept as ``model.tp_placements``. A no-op (all replicated, none partial) at tp=1."""
    if not tp.enabled:
        model.tp_placements = {name: TpPlacement() for name, _ in model.named_parameters()}
        return model.tp_placements
    check_divisible(model.args, tp.size)
    model.tp = tp
    placements: dict[str, TpPlacement] = {}
    for name, module in model.named_modules():
        mode = tp.replicated() if name == "mtp" or name.startswith("mtp.") else tp
        prefix = f"{name}." if name else ""
        if isinstance(module, MLA):
            module.tp, module.n_heads = mode, module.n_heads // tp.size
            for column in ("wq", "wq_b", "wkv_b"):
                if hasattr(module, column):
                    _split(getattr(module, column), 0, tp)
                    placements[f"{prefix}{column}.weight"] = TpPlacement(0)
            _split(module.wo, 1, tp)
            placements[f"{prefix}wo.weight"] = TpPlacement(1)
            for norm in ("q_norm", "kv_norm"):  # past the region's entry: each rank's heads
                if hasattr(module, norm):
                    placements[f"{prefix}{norm}.weight"] = TpPlacement(None, partial_grad=True)
        elif isinstance(module, MLP):
            module.tp = mode
            for column in ("w1", "w3"):
                _split(getattr(module, column), 0, tp)
                placements[f"{prefix}{column}.weight"] = TpPlacement(0)
            _split(module.w2, 1, tp)
            placements[f"{prefix}w2.weight"] = TpPlacement(1)
        elif isinstance(module, MoE):
            module.tp = mode
            placements[f"{prefix}gate.weight"] = TpPlacement(None, partial_grad=True)  # each rank's rows
        elif isinstance(module, GroupedExperts):
            for param_name, _ in module.named_parameters(recurse=False):  # each rank's rows: partial
                placements[f"{prefix}{param_name}"] = TpPlacement(None, partial_grad=True)
    vocab_rows = model.args.vocab_size // tp.size
    start = tp.rank * vocab_rows
    if hasattr(model, "embed"):
        weight = model.embed.weight.detach().chunk(tp.size, 0)[tp.rank].clone()
        model.embed = VocabParallelEmbedding(nn.Parameter(weight), start, tp)
        placements["embed.weight"] = TpPlacement(0)
    if hasattr(model, "head"):
        _split(model.head, 0, tp)
        model.head.vocab_shard, model.head.tp = VocabShard(start, tp.group), tp
        placements["head.weight"] = TpPlacement(0)
    for name, _ in model.named_parameters():
        if name not in placements:  # replicated: partial where the module saw a sequence shard
            in_mtp = name.startswith("mtp.")
            placements[name] = TpPlacement(None, partial_grad=tp.sequence_parallel and not in_mtp)
    model.tp_placements = placements
    return placements


def tp_blocks(model: nn.Module) -> dict[str, Block]:
    """Each split parameter's block of its whole tensor, by FQN (empty at tp=1): checkpoints hold every tensor in
    its whole shape (``haillm.train.checkpoint``), so that they resume at any tp and read whole at tp=1."""
    tp, placements = getattr(model, "tp", None), getattr(model, "tp_placements", {})
    if tp is None or not tp.enabled:
        return {}
    peers = tuple(dist.get_process_group_ranks(tp.group))
    return {name: Block(pl.shard_dim, tp.rank, peers) for name, pl in placements.items() if pl.shard_dim is not None}


def sum_partial_grads(model: nn.Module, placements: dict[str, TpPlacement], tp: TensorParallel) -> None:
    """Add up over ``tp`` the gradients that are partial sums (``placements``), in one collective: for code that
    reduces gradients itself (the layer tests); ZeroAdamW reduces them over its groups instead."""
    grads = [p.grad for name, p in model.named_parameters() if placements[name].partial_grad and p.grad is not None]
    if not tp.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp.group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))
