"""Which shards each reader (rank, worker) reads in each reader epoch: pure functions of the seed."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pijepa.data.wds.spec import ShardSet

# Keep the seed streams of different uses apart; TAG_RESEED marks the streams a resume at another
# reader layout starts afresh (resampled mode), so they never coincide with the original ones.
TAG_ORDER, TAG_DRAW, TAG_SHUFFLE, TAG_RESEED = 1, 2, 3, 4


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers; SeedSequence hashing keeps nearby tuples unrelated."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def balanced_split(order: Sequence[int], counts: Sequence[int | None], parts: int) -> list[list[int]]:
    """Deal shards in ``order`` to ``parts`` readers, each to the reader with fewest samples so far
    (ties: lowest reader); with unknown counts, round-robin."""
    if any(counts[k] is None for k in order):
        return [list(order[p::parts]) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0, p) for p in range(parts)]
    for k in order:
        total, p = heapq.heappop(heap)
        out[p].append(int(k))
        heapq.heappush(heap, (total + (counts[k] or 0), p))  # `or 0`: never None here, for mypy
    return out


@dataclass(frozen=True)
class ReaderPlan:
    """Which shards reader (rank, worker) reads in each reader epoch."""

    shards: ShardSet
    mode: str
    seed: int
    world_size: int
    workers: int  # logical workers per rank (1 for num_workers 0)
    # resampled mode: the step at which a resume at another layout started fresh streams (None:
    # the run's original streams); it is part of the loader state so that later resumes replay them
    reseed: int | None = None

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    def _seed(self, tag: int, *values: int) -> int:
        if self.reseed is None:  # the original streams: seeds as they always were (old checkpoints)
            return mix_seed(self.seed, tag, *values)
        return mix_seed(self.seed, TAG_RESEED, self.reseed, tag, *values)

    def epoch_split(self, epoch: int) -> list[list[int]]:
        """finite mode: every reader's shards of reader epoch ``epoch`` (reader index rank x workers + worker)."""
        order = np.random.default_rng(self._seed(TAG_ORDER, epoch)).permutation(len(self.shards.urls))
        return balanced_split(order.tolist(), self.shards.counts, self.readers)

    def epoch_shards(self, epoch: int, rank: int, worker: int) -> list[int]:
        if self.mode == "finite":
            return self.epoch_split(epoch)[rank * self.workers + worker]
        rng = np.random.default_rng(self._seed(TAG_DRAW, epoch, rank, worker))
        return rng.integers(0, len(self.shards.urls), size=math.ceil(len(self.shards.urls) / self.readers)).tolist()

    def shuffle_seed(self, epoch: int, rank: int, worker: int) -> int:
        return self._seed(TAG_SHUFFLE, epoch, rank, worker)

    def epoch_length(self, shards: Sequence[int]) -> int | None:
        counts = [self.shards.counts[k] for k in shards]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    def epoch_samples(self) -> int:
        """Samples in one finite reader epoch: the indexed total, else the configured epoch."""
        return self.epoch_length(range(len(self.shards.urls))) or len(self.shards)
