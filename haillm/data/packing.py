"""Packing: documents -> one token stream (EOD after each) -> non-overlapping rows of seq_len + 1 tokens.

`build_dataset` packs a source in memory, or memory-maps a preprocessed directory (`haillm.data.shards`),
which holds the same stream and so gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from haillm.data.config import DataConfig, DataError, setting
from haillm.data.shards import ShardDataset, read_manifest
from haillm.data.sources import describe_source, iter_documents
from haillm.data.tokenizer import Tokenizer, build_tokenizer


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into rows of `seq_len + 1` tokens; the tail that does not fill a row is dropped.

    Rows overlap by nothing: a row's last token is only a target, and the next row starts after it.
    """
    width = seq_len + 1
    rows = len(stream) // width
    return stream[: rows * width].reshape(rows, width)


class PackedDataset:
    """Packed token rows. Row i is one training sequence: inputs `row[:-1]`, targets `row[1:]`."""

    def __init__(self, rows: torch.Tensor, tokenizer: Tokenizer, source: str, num_tokens: int):
        self.rows = rows  # int32 [num_samples, seq_len + 1]
        self.tokenizer = tokenizer
        self.source = source
        self.num_tokens = num_tokens  # tokens in the stream before cutting, EODs included

    @property
    def num_samples(self) -> int:
        return self.rows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1] - 1

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index].long()

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor [len(indices), seq_len + 1] of the given rows, in the given order."""
        return self.rows[torch.as_tensor(indices, dtype=torch.long)].long()


class RowSlice:
    """Rows [start, stop) of a dataset, numbered from 0: a held-out split that training never sees."""

    def __init__(self, dataset: PackedDataset | ShardDataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop
        self.tokenizer, self.seq_len = dataset.tokenizer, dataset.seq_len
        self.source = f"rows [{start}, {stop}) of {dataset.source}"

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return self.num_samples

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        if any(not 0 <= i < self.num_samples for i in indices):
            raise IndexError(f"rows {list(indices)} out of range for {self.num_samples} rows")
        return self.dataset.gather([self.start + i for i in indices])


def build_dataset(cfg: DataConfig, seq_len: int, min_samples: int = 1,
                  needed_for: str = "one global batch") -> PackedDataset | ShardDataset:
    """Read, tokenize and pack `cfg.source`, or memory-map it when it is a preprocessed directory.

    `min_samples` is the number of sequences one optimizer step needs (the global batch size); a source
    that packs into fewer raises DataError saying what it has and what it needs.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokenizer = build_tokenizer(cfg.tokenizer)  # a bad tokenizer fails before any data is read
    if read_manifest(cfg.source) is not None:
        dataset = ShardDataset(cfg.source, seq_len, tokenizer)
    else:
        stream = np.concatenate([tokenizer.encode_documents(docs) for docs in iter_documents(cfg)])
        rows = pack(stream, seq_len)
        dataset = PackedDataset(torch.from_numpy(rows), tokenizer, describe_source(cfg), len(stream))
    need = max(min_samples, 1)
    if dataset.num_samples < need:
        more = ("preprocess more text (--max-bytes; data.max_bytes does not apply to shards)"
                if isinstance(dataset, ShardDataset) else f"add data, raise {setting('max_bytes')}")
        raise DataError(
            f"{dataset.source} is too small: {dataset.num_tokens} tokens make {dataset.num_samples} sequences "
            f"of {seq_len + 1} tokens, but {needed_for} needs {need} ({need * (seq_len + 1)} tokens); {more}, "
            f"or lower train.global_batch_size or train.seq_len"
        )
    return dataset
