"""The training loader for map-style datasets: a step-addressed sampler, so that data, augmentation
and masks are pure functions of (seed, micro-batch index).

Micro-batch index `u = (step * accum + micro) * world + rank` numbers every micro-batch of the run.
One process with accumulation 2 and two ranks without accumulation see exactly the same batches,
masks and crops, the number of DataLoader workers changes nothing, and resuming at a step needs no
state but the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TypeVar, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pijepa.data.transforms import crop_seed
from pijepa.runtime.errors import DataError, UserError, without_worker_traceback
from pijepa.runtime.log import warn
from pijepa.runtime.signals import ignore_preemption_signals, stop_workers_at_exit

MAX_SUBSTITUTES = 16


def dataset_len(dataset: Dataset) -> int:
    """Map-style datasets have a length, though torch's Dataset type does not declare __len__."""
    return len(cast(Sized, dataset))


T = TypeVar("T")


def one_line_errors(batches: Iterable[T]) -> Iterator[T]:
    """`batches`, with a user error raised in a DataLoader worker turned back into one line (see
    runtime.errors.without_worker_traceback)."""
    try:
        yield from batches
    except UserError as err:
        raise without_worker_traceback(err) from None


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for one rank, the micro-batches `[(u, index), ...]` of steps `start_step..total_steps-1`."""

    def __init__(self, dataset_len: int, batch_size: int, accum: int, world_size: int, rank: int,
                 start_step: int, total_steps: int, seed: int):
        self.batch_size, self.accum, self.world, self.rank = batch_size, accum, world_size, rank
        self.start_step, self.total_steps, self.seed = start_step, total_steps, seed
        self.dataset_len = dataset_len
        self.micro_per_step = accum * world_size
        self.steps_per_epoch = dataset_len // (batch_size * self.micro_per_step)
        if self.steps_per_epoch == 0:
            raise DataError(f"dataset of {dataset_len} images is smaller than one optimizer step of "
                            f"{batch_size * self.micro_per_step} images")
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)  # no epoch is -1: drawn on first use

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:  # one permutation per epoch, drawn from (seed, epoch)
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            # Every image can be drawn: the epoch takes the first n of a permutation of all of them.
            n = self.steps_per_epoch * self.micro_per_step * self.batch_size
            self._perm, self._perm_epoch = torch.randperm(self.dataset_len, generator=g)[:n], epoch
        return self._perm

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = self.steps_per_epoch * self.micro_per_step
        for step in range(self.start_step, self.total_steps):
            for micro in range(self.accum):
                u = (step * self.accum + micro) * self.world + self.rank
                epoch, j = divmod(u, per_epoch)
                rows = self._permutation(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
                yield [(u, int(i)) for i in rows]


class StepDataset(Dataset):
    """Wraps a dataset of `(uint8 image, label)`; item `(u, index)` gives `(u, transformed, label)`.

    The transform's randomness is seeded from `(seed, u, index)` inside a forked RNG, so crops do
    not depend on the worker that makes them and the caller's RNG is left untouched.
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return dataset_len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        u, index = key
        image, label, skipped = self._readable(index)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue a CUDA seed, which costs
            # milliseconds per call on a machine where CUDA is not initialised.
            torch.default_generator.manual_seed(crop_seed(self.seed, u, index))
            image = self.transform(image)
        return u, image, label, skipped

    def _readable(self, index: int):
        """The image at `index`, or, when it cannot be decoded (corrupt, truncated, not an image),
        the next readable one of a fixed sequence of others: a deterministic substitute, so that
        batches keep their size and a resumed run sees the same data. Each skip is reported."""
        for attempt in range(MAX_SUBSTITUTES + 1):
            i = (index + attempt * 7919) % len(self)
            try:
                image, label = self.dataset[i]
                return image, label, attempt
            except Exception as e:  # decode errors name the file
                warn(f"skipping unreadable image #{i}: {e}", all_ranks=True)
        raise DataError(f"{MAX_SUBSTITUTES + 1} images in a row are unreadable (from #{index}): "
                        f"the dataset is damaged; see the warnings above")


class StepLoader:
    """The DataLoader over a StepDataset; counts the unreadable images that were substituted
    (`data_skipped`, cumulative in this process, logged by the trainer)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.skipped = loader, 0

    def __iter__(self):
        for *batch, skipped in one_line_errors(self.loader):
            self.skipped += int(skipped)
            yield tuple(batch)

    def __len__(self) -> int:
        return len(self.loader)

    def counters(self) -> dict[str, int]:
        return {"data_skipped": self.skipped}


def build_step_loader(dataset: Dataset, transform: Callable, collator: Callable, *, batch_size: int,
                      accum: int, world_size: int, rank: int, start_step: int, total_steps: int,
                      seed: int, num_workers: int, pin_memory: bool) -> StepLoader:
    sampler = StepBatchSampler(dataset_len(dataset), batch_size, accum, world_size, rank,
                               start_step, total_steps, seed)

    def collate(items):  # the collator sees (u, image, label); the skip count rides along
        return (*collator([item[:3] for item in items]), sum(item[3] for item in items))

    if num_workers:
        stop_workers_at_exit()
    return StepLoader(DataLoader(StepDataset(dataset, transform, seed), batch_sampler=sampler, collate_fn=collate,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                 worker_init_fn=ignore_preemption_signals))
