"""Which shards each reader (rank, worker) reads in each reader epoch: pure functions of the seed."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pijepa.data.wds.spec import ShardSet

TAG_ORDER, TAG_DRAW, TAG_SHUFFLE = 1, 2, 3  # keep the seed streams of different uses apart


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

    def epoch_shards(self, epoch: int, rank: int, worker: int) -> list[int]:
        n, readers = len(self.shards.urls), self.world_size * self.workers
        if self.mode == "finite":
            order = np.random.default_rng(mix_seed(self.seed, TAG_ORDER, epoch)).permutation(n)
            return balanced_split(order.tolist(), self.shards.counts, readers)[rank * self.workers + worker]
        rng = np.random.default_rng(mix_seed(self.seed, TAG_DRAW, epoch, rank, worker))
        return rng.integers(0, n, size=math.ceil(n / readers)).tolist()

    def epoch_length(self, shards: Sequence[int]) -> int | None:
        counts = [self.shards.counts[k] for k in shards]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
