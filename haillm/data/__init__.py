"""Data pipeline: sources -> tokenizer -> packed rows -> deterministic, resumable, rank-aware batches.

Typical use (one data-parallel rank):

    dataset = build_dataset(cfg.data, seq_len, min_samples=global_batch_size)
    sampler = StepSampler(dataset.num_samples, global_batch_size, seed, cfg.data.shuffle)
    batcher = StepBatcher(dataset, sampler, dp_rank, dp_size, micro_batch_size)
    micro_batches = batcher.next_step()  # list of LongTensor [micro_batch_size, seq_len + 1]

`build_dataset` memory-maps a directory written by `python -m haillm.tools.preprocess` (`shards`), and
`loader.build_training_data` adds weighted blends (`blend`) and held-out rows; `prefetch.Prefetcher`
prepares the next step in the background.
"""

from haillm.data.config import DataConfig, DataError
from haillm.data.packing import PackedDataset, build_dataset, pack
from haillm.data.sampler import StepBatcher, StepSampler, rank_micro_batches
from haillm.data.sources import iter_documents
from haillm.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "HFTokenizer",
    "PackedDataset",
    "StepBatcher",
    "StepSampler",
    "build_dataset",
    "build_tokenizer",
    "iter_documents",
    "pack",
    "rank_micro_batches",
]
