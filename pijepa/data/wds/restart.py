"""Resuming the webdataset loader at another reader layout (world size or ``data.num_workers``).

Checkpointed positions belong to the old readers: a reader of another layout reads other shards in
another shuffle, so no position of it corresponds to theirs. Every new reader therefore restarts
from one position that every rank derives alike from the checkpoint; what that repeats or skips is
described in :mod:`pijepa.data.wds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pijepa.data.wds.plan import ReaderPlan
from pijepa.runtime.errors import DataError


@dataclass(frozen=True)
class Restart:
    """Where the new readers start: reader epoch ``epoch`` at offset 0, in the streams of ``reseed``."""

    epoch: int
    reseed: int | None
    repeated: int = 0  # finite: samples used before the checkpoint that are read again
    skipped: int = 0  # finite: samples of the earlier reader epochs that will not be read
    exact: bool = True  # the two counts are exact (sample counts known), else estimates
    skipped_corrupt: int = 0  # corrupt samples the old readers had counted: the counter goes on


def old_plan(plan: ReaderPlan, state: dict[str, Any]) -> ReaderPlan:
    """The plan the checkpointed readers followed."""
    return replace(plan, world_size=int(state["world_size"]), workers=int(state["workers"]),
                   reseed=state.get("reseed"))


def reader_positions(state: dict[str, Any]) -> list[tuple[int, int]]:
    """(reader epoch, offset) of every checkpointed reader, in reader order (rank x workers + worker)."""
    ranks, world, workers = state.get("ranks") or [], state["world_size"], state["workers"]
    if len(ranks) != world or any(r is None or len(r.get("readers", ())) != workers for r in ranks):
        raise DataError(f"cannot resume the webdataset loader: its state holds the positions of "
                        f"{sum(r is not None for r in ranks)} of {world} ranks x {workers} workers "
                        f"(a checkpoint written by every rank is expected)")
    return [(int(x["epoch"]), int(x["offset"])) for r in ranks for x in r["readers"]]


class _Lengths:
    """Samples per old reader and reader epoch (finite), computed once per epoch."""

    def __init__(self, plan: ReaderPlan):
        self.plan, self.total = plan, plan.epoch_samples()
        self.cache: dict[int, list[int]] = {}
        self.exact = all(c is not None for c in plan.shards.counts)

    def of(self, epoch: int) -> list[int]:
        if epoch not in self.cache:
            n, split = len(self.plan.shards.urls), self.plan.epoch_split(epoch)
            # unknown counts: a reader's share of the configured epoch, by its number of shards
            self.cache[epoch] = [self.plan.epoch_length(s) or round(self.total * len(s) / n) for s in split]
        return self.cache[epoch]

    def through(self, reader: int, first: int, stop: int) -> int:
        """Samples of ``reader`` in reader epochs ``first .. stop - 1``."""
        return sum(self.of(e)[reader] for e in range(first, stop))


def finite_restart(old: ReaderPlan, positions: Sequence[tuple[int, int]]) -> Restart:
    """Start of the reader epoch that the checkpoint's position falls in: the samples the old readers
    had read in all, counted from the earliest reader epoch any of them was in, over the epoch size.
    Summing the readers' own positions (not step x global batch) stays right when readers drift
    apart or when an earlier resume of this kind already moved the reader epochs."""
    lengths, first = _Lengths(old), min(e for e, _ in positions)
    read = [lengths.through(i, first, e) + offset for i, (e, offset) in enumerate(positions)]
    epoch = first + sum(read) // max(1, lengths.total)
    reached = [lengths.through(i, first, epoch) for i in range(len(positions))]
    return Restart(epoch, None, repeated=sum(max(0, a - b) for a, b in zip(read, reached)),
                   skipped=sum(max(0, b - a) for a, b in zip(read, reached)), exact=lengths.exact)


def plan_restart(old: ReaderPlan, state: dict[str, Any], step: int) -> Restart:
    """Where every reader of the new layout starts; the same on every rank."""
    positions = reader_positions(state)
    corrupt = sum(int(x.get("skipped", 0)) for r in state["ranks"] for x in r["readers"])
    if old.mode == "finite":
        return replace(finite_restart(old, positions), skipped_corrupt=corrupt)
    # resampled: fresh streams seeded from (seed, step); never the old ones, whose draws the old
    # readers had partly read
    return Restart(0, step, skipped_corrupt=corrupt)


def describe(restart: Restart, old: ReaderPlan, new: ReaderPlan, step: int) -> str:
    """The one-line warning of a restart."""
    head = (f"data: resuming the webdataset loader at step {step} on {new.world_size} rank(s) x {new.workers} "
            f"worker(s) from a checkpoint of {old.world_size} x {old.workers}: positions are per reader, so ")
    if restart.reseed is not None:
        return head + f"every reader starts a fresh resampled stream seeded from (data seed, step {restart.reseed})"
    about = "" if restart.exact else "about "
    return head + (f"every reader restarts at the start of reader epoch {restart.epoch} (finite): {about}"
                   f"{restart.repeated} sample(s) read before the checkpoint are read again and {about}"
                   f"{restart.skipped} of the earlier reader epochs are not read")
