"""Held-out evaluation: the model's mean next-token loss (`lm_loss`) on fixed held-out batches.

`evaluate` is the whole computation. The trainer runs it every `train.eval_interval` steps through an
`Evaluator` (its `eval_loss` goes to metrics.jsonl, wandb and the progress bar); evaluating a saved
checkpoint on the same batches with `evaluate` gives the same number.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from haillm.data.loader import eval_row_ids
from haillm.parallel.mesh import ParallelDims


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
             group: dist.ProcessGroup | None = None) -> float:
    """Mean `lm_loss` over micro-batches `[B, T + 1]` (the same B for all), in eval mode (no expert-load
    counting, no balance loss), summed over `group`'s ranks when given (each passes its share). No autocast:
    the forward computes as training's does, in the parameters' own dtype (bf16 ones in a bf16 run)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, micro-batch count
    try:
        for batch in batches:
            sums[0] += model.compute_loss(batch.to(device, non_blocking=True))["lm_loss"].double()
            sums[1] += 1
    finally:
        model.train(was_training)
    if group is not None:
        dist.all_reduce(sums, group=group)
    return (sums[0] / sums[1]).item()


class Evaluator:
    """Evaluates `model` on this rank's fixed micro-batches of a held-out dataset every `interval` steps."""

    def __init__(self, model: torch.nn.Module, dataset, row_ids: Sequence[Sequence[int]], interval: int,
                 device: torch.device, group: dist.ProcessGroup | None = None):
        self.model, self.dataset, self.row_ids, self.interval = model, dataset, row_ids, interval
        self.device, self.group = device, group

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def batches(self) -> Iterable[torch.Tensor]:
        return (self.dataset.gather(ids) for ids in self.row_ids)

    def run(self) -> dict:
        start = time.perf_counter()
        loss = evaluate(self.model, self.batches(), self.device, self.group)
        return {"eval_loss": loss, "eval_time_s": time.perf_counter() - start}


def build_evaluator(cfg: DictConfig, eval_dataset, model: torch.nn.Module, dims: ParallelDims,
                    device: torch.device) -> Evaluator | None:
    """This rank's evaluator when `train.eval_interval` > 0 (`eval_dataset` holds the held-out rows)."""
    t = cfg.train
    if not t.eval_interval:
        return None
    row_ids = eval_row_ids(t.eval_batches, t.global_batch_size, dims.dp_rank, dims.dp, t.micro_batch_size)
    group = dims.group("dp_cp") if dims.dp_cp > 1 else None  # context-parallel ranks evaluate chunks of the same rows
    return Evaluator(model, eval_dataset, row_ids, t.eval_interval, device, group)
