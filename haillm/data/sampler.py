"""Deterministic, resumable, data-parallel-aware sample order.

The sample order is an infinite sequence: epoch e is a permutation of all samples drawn from a generator
seeded with (seed, e) (or the identity when not shuffling), and epochs follow each other. Optimizer step s
takes positions [s * GBS, (s + 1) * GBS) of it. The only state is the global `consumed_samples` count, so
a run resumes exactly, even at another data-parallel size: each dp rank takes a contiguous share of the
step's samples, so the ranks' micro-batches in rank-major order are exactly the dp=1 step's list.
"""

from __future__ import annotations

import numpy as np
import torch

from haillm.data.config import DataError
from haillm.data.packing import PackedDataset


class SampleOrder:
    """An infinite sequence of sample ids: seeded permutations of `num_samples` ids (or the identity), one
    per epoch, back to back. `stream` tells apart the orders of several datasets drawn with one seed.

    A permutation is held as int32 when the ids fit (4 bytes a sample, two epochs cached); the identity is
    never materialised."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, stream: tuple[int, ...] = ()):
        self.num_samples, self.seed, self.shuffle, self.stream = num_samples, seed, shuffle, stream
        self.dtype = np.int32 if num_samples < 2**31 else np.int64
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=self.dtype)
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step spans at most two epochs: keep the cache tiny
                self._orders.pop(min(self._orders))
            # the ids rng.permutation(num_samples) gives (it shuffles an int64 arange the same way)
            order = np.arange(self.num_samples, dtype=self.dtype)
            np.random.default_rng([self.seed % 2**64, *self.stream, epoch]).shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at the given positions of the sequence (non-decreasing, spanning few epochs)."""
        epochs, offsets = np.divmod(positions, self.num_samples)
        if not self.shuffle:
            return offsets
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            ids[here] = self.epoch_order(int(epoch))[offsets[here]]
        return ids


class StepSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0, shuffle: bool = True):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if num_samples < global_batch_size:
            raise DataError(
                f"the dataset has {num_samples} sequences, fewer than one global batch ({global_batch_size})"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = 0
        self.order = SampleOrder(num_samples, seed, shuffle)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids in the order epoch `epoch` visits them."""
        return self.order.epoch_order(epoch)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Global sample ids at positions of the infinite sample order."""
        return self.order.ids_at(positions)

    def indices_for_step(self, consumed_samples: int) -> list[int]:
        """Global sample ids of the optimizer step that starts at position `consumed_samples`."""
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        return self.ids_at(np.arange(consumed_samples, consumed_samples + self.global_batch_size)).tolist()

    def next_indices(self) -> list[int]:
        """The next step's global sample ids; advances the position."""
        ids = self.indices_for_step(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        return ids

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["consumed_samples"]`; the order must come from the same data and seed."""
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)} (the dataset, data.shuffle or seed changed)"
                )
        self.consumed_samples = int(state["consumed_samples"])


def rank_micro_batches(
    indices: list[int], dp_rank: int, dp_size: int, micro_batch_size: int
) -> list[list[int]]:
    """Data-parallel rank `dp_rank`'s contiguous share of one step's ids, split into micro-batches."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if len(indices) % (dp_size * micro_batch_size):
        raise ValueError(
            f"a global batch of {len(indices)} sequences does not divide into micro_batch_size "
            f"({micro_batch_size}) x dp ({dp_size})"
        )
    share = len(indices) // dp_size
    mine = indices[dp_rank * share : (dp_rank + 1) * share]
    return [mine[i : i + micro_batch_size] for i in range(0, share, micro_batch_size)]


class StepBatcher:
    """One data-parallel rank's micro-batches, one optimizer step at a time. State = the sampler's."""

    def __init__(
        self,
        dataset: PackedDataset,
        sampler: StepSampler,
        dp_rank: int = 0,
        dp_size: int = 1,
        micro_batch_size: int = 1,
    ):
        # fail now, not at the first step, on a layout that does not divide the global batch
        rank_micro_batches(list(range(sampler.global_batch_size)), dp_rank, dp_size, micro_batch_size)
        self.dataset = dataset
        self.sampler = sampler
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size

    def step_at(self, consumed_samples: int) -> list[torch.Tensor]:
        """This rank's micro-batches of the step starting at `consumed_samples` (a pure function of it)."""
        ids = self.sampler.indices_for_step(consumed_samples)
        micro = rank_micro_batches(ids, self.dp_rank, self.dp_size, self.micro_batch_size)
        return [self.dataset.gather(m) for m in micro]

    def next_step(self) -> list[torch.Tensor]:
        """LongTensors [micro_batch_size, seq_len + 1], one per micro-batch of this rank for the next step."""
        batches = self.step_at(self.sampler.consumed_samples)
        self.sampler.consumed_samples += self.sampler.global_batch_size
        return batches

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Nothing to stop (the Prefetcher's interface: the trainer closes whichever it has)."""
