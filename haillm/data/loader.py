"""What a run trains and evaluates on, from the `data` config: the training rows and their sample order
(one source, or a weighted blend), the held-out rows, and one data-parallel rank's batches of each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from haillm.data.blend import BlendedDataset, BlendSampler, parse_blend
from haillm.data.config import DataConfig, DataError
from haillm.data.packing import PackedDataset, RowSlice, build_dataset
from haillm.data.prefetch import Prefetcher
from haillm.data.sampler import StepBatcher, StepSampler, rank_micro_batches
from haillm.data.shards import ShardDataset
from haillm.data.tokenizer import build_tokenizer

Dataset = PackedDataset | ShardDataset | RowSlice | BlendedDataset


@dataclass
class TrainingData:
    dataset: Dataset  # the rows training draws from
    sampler: StepSampler  # their order: StepSampler, or BlendSampler for a blend
    eval_dataset: Dataset | None  # held-out rows, None without evaluation


def _blend(cfg: DataConfig, seq_len: int, global_batch_size: int, seed: int) -> tuple[Dataset, StepSampler]:
    try:
        entries = parse_blend(cfg.blend)
    except ValueError as e:
        raise DataError(str(e)) from None
    tokenizer = build_tokenizer(cfg.tokenizer)
    parts = [ShardDataset(path, seq_len, tokenizer) for _, path in entries]  # each checks it is preprocessed
    for part in parts:
        if part.num_samples == 0:
            raise DataError(f"data.blend dataset {part.path} has {part.num_tokens} tokens: not one sequence of "
                            f"{seq_len + 1}")
    sampler = BlendSampler([p.num_samples for p in parts], [w for w, _ in entries], global_batch_size, seed,
                           cfg.shuffle)
    return BlendedDataset(parts), sampler


def build_training_data(cfg: DataConfig | DictConfig, seq_len: int, global_batch_size: int, seed: int,
                        eval_samples: int = 0) -> TrainingData:
    """Training rows and order, and held-out rows: the last `cfg.eval_holdout` fraction of `cfg.source`
    (kept out of training whether or not this run evaluates, so evaluation never changes what it trains
    on), or `cfg.eval_source` when this run evaluates on `eval_samples` rows (>0). `cfg` may be the
    launcher's OmegaConf `data` node."""
    if isinstance(cfg, DictConfig):  # a plain dataclass, so that it can be copied with another source
        cfg = DataConfig(**OmegaConf.to_container(cfg, resolve=True))
    eval_dataset = None
    if cfg.blend:
        dataset, sampler = _blend(cfg, seq_len, global_batch_size, seed)
    else:
        dataset = build_dataset(cfg, seq_len, min_samples=global_batch_size)
        if cfg.eval_holdout > 0:
            total = dataset.num_samples
            held = int(total * cfg.eval_holdout)
            if held < eval_samples or held < 1 or total - held < global_batch_size:
                raise DataError(
                    f"data.eval_holdout={cfg.eval_holdout} of {total} sequences holds out {held}; evaluation "
                    f"needs {max(eval_samples, 1)} (train.eval_batches x train.global_batch_size) and training "
                    f"one global batch ({global_batch_size}) of the rest"
                )
            dataset, eval_dataset = RowSlice(dataset, 0, total - held), RowSlice(dataset, total - held, total)
        sampler = StepSampler(dataset.num_samples, global_batch_size, seed, cfg.shuffle)
    if eval_samples and cfg.eval_source:
        eval_dataset = build_dataset(dataclasses.replace(cfg, source=cfg.eval_source), seq_len, eval_samples,
                                     "evaluation (train.eval_batches x train.global_batch_size)")
    elif eval_samples and eval_dataset is None:
        raise DataError("evaluation needs held-out data: set data.eval_source (or data.eval_holdout with "
                        "a single data.source)")
    return TrainingData(dataset, sampler, eval_dataset)


def make_batcher(data: TrainingData, dp_rank: int, dp_size: int, micro_batch_size: int,
                 device: torch.device, prefetch: bool = True, end: int | None = None) -> StepBatcher | Prefetcher:
    """This rank's training batches, prepared in the background when `prefetch`, up to the step that
    starts at sample `end` (train.steps x train.global_batch_size: the run's last step)."""
    batcher = StepBatcher(data.dataset, data.sampler, dp_rank, dp_size, micro_batch_size)
    return Prefetcher(batcher, device, end) if prefetch else batcher


def eval_row_ids(num_batches: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of the evaluation: the held-out set's first `num_batches` global batches,
    in order, split over ranks like a training step (so every layout evaluates the same rows)."""
    micro = []
    for b in range(num_batches):
        ids = list(range(b * global_batch_size, (b + 1) * global_batch_size))
        micro += rank_micro_batches(ids, dp_rank, dp_size, micro_batch_size)
    return micro
