"""Weighted blends of preprocessed datasets: `data.blend=[0.7:/data/web,0.3:/data/code]`.

The blend's infinite sample order is a fixed interleaving of its datasets: position p draws from dataset
`pattern[p % PERIOD]`, where the pattern is Megatron's greedy interleave (each position goes to the
dataset furthest below its share) over PERIOD positions, so every PERIOD consecutive samples hold each
dataset's share to within one sample. The n-th draw from dataset d is position n of d's own `SampleOrder`
(a seeded permutation of its rows per epoch of d, independent of the other datasets). Position -> (dataset,
row) is index arithmetic, so the global `consumed_samples` of a checkpoint resumes the blend exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from haillm.data.config import DataError
from haillm.data.sampler import SampleOrder, StepSampler
from haillm.data.shards import ShardDataset

PERIOD = 10_000


def parse_blend(entries: Sequence[str]) -> list[tuple[float, str]]:
    """["0.7:/data/web", ...] -> [(0.7, "/data/web"), ...]; ValueError with one line on a bad entry."""
    parsed = []
    for entry in entries:
        weight, sep, path = str(entry).partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not path or not w > 0 or w == float("inf"):
            raise ValueError(f"data.blend entry {entry!r} is not WEIGHT:DIR with a positive weight "
                             "(e.g. data.blend=[0.7:/data/web,0.3:/data/code])")
        parsed.append((w, path))
    return parsed


def interleave(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """Dataset of each of `period` positions: each goes to the dataset furthest below weight x position."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.zeros(len(share))
    pattern = np.empty(period, dtype=np.int64)
    for i in range(period):
        d = int(np.argmax(share * (i + 1) - counts))
        pattern[i] = d
        counts[d] += 1
    return pattern


class BlendSampler(StepSampler):
    """StepSampler over the concatenated ids of several datasets (dataset d's rows are ids
    offsets[d] .. offsets[d+1] - 1), visited in the blend's order instead of one permutation."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], global_batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(int(sum(sizes)), global_batch_size, seed, shuffle)
        self.sizes, self.weights = list(sizes), [w / sum(weights) for w in weights]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.orders = [SampleOrder(n, seed, shuffle, stream=(d,)) for d, n in enumerate(sizes)]
        self.pattern = interleave(self.weights)
        starved = [d for d in range(len(sizes)) if not (self.pattern == d).any()]
        if starved:
            raise DataError(f"data.blend weight {weights[starved[0]]} is too small: below one sample in {PERIOD}")
        self.per_period = np.bincount(self.pattern, minlength=len(sizes))
        # rank of each pattern position among the positions of its dataset
        self.rank = np.empty(PERIOD, dtype=np.int64)
        for d in range(len(sizes)):
            here = self.pattern == d
            self.rank[here] = np.arange(int(here.sum()))

    def sources_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, draw number within that dataset) of each position of the blend order."""
        cycles, r = np.divmod(positions, PERIOD)
        datasets = self.pattern[r]
        return datasets, cycles * self.per_period[datasets] + self.rank[r]

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        datasets, draws = self.sources_at(positions)
        ids = np.empty_like(positions)
        for d in np.unique(datasets):
            here = datasets == d
            ids[here] = self.offsets[d] + self.orders[d].ids_at(draws[here])
        return ids

    def state_dict(self) -> dict:
        return {**super().state_dict(), "blend": [[w, n] for w, n in zip(self.weights, self.sizes, strict=True)]}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()["blend"]
        if state.get("blend") != mine:
            raise DataError(f"cannot resume the data order: the checkpoint's blend (weight, sequences) is "
                            f"{state.get('blend')}, this run's is {mine} (data.blend or train.seq_len changed)")
        super().load_state_dict(state)


class BlendedDataset:
    """The rows of several datasets under one id space (dataset d's row i is id offsets[d] + i)."""

    def __init__(self, datasets: Sequence[ShardDataset]):
        self.datasets = list(datasets)
        self.offsets = np.concatenate([[0], np.cumsum([d.num_samples for d in datasets])]).astype(np.int64)
        self.tokenizer, self.seq_len = datasets[0].tokenizer, datasets[0].seq_len
        self.num_tokens = sum(d.num_tokens for d in datasets)
        self.source = "blend of " + ", ".join(str(d.path) for d in datasets)

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_samples

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        ids = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        out = torch.empty((len(ids), self.seq_len + 1), dtype=torch.long)
        for d in np.unique(which):
            here = np.flatnonzero(which == d)
            out[torch.from_numpy(here)] = self.datasets[d].gather((ids[here] - self.offsets[d]).tolist())
        return out
