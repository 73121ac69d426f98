"""The main-process side of the webdataset loader: one rank's batches in order, its position
(checkpointed, restored on resume) and its skip counter; see :mod:`pijepa.data.wds`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from pijepa.data.loader import one_line_errors
from pijepa.data.wds.plan import ReaderPlan
from pijepa.data.wds.restart import describe, old_plan, plan_restart
from pijepa.data.wds.spec import MODES, ShardSet, check_readers
from pijepa.data.wds.stream import ShardStream
from pijepa.runtime.errors import ConfigError, DataError
from pijepa.runtime.log import warn
from pijepa.runtime.signals import ignore_preemption_signals, stop_workers_at_exit

STATE_FORMAT = "pijepa-wds-loader-v1"  # "reseed" was added later: absent reads as None
DATA_KEYS = ("format", "mode", "seed", "num_shards", "shards")  # other data: never resumed
LAYOUT_KEYS = ("world_size", "workers")  # another reader layout: the readers restart (restart.py)
REPLAY_KEYS = ("batch_size", "shuffle_buffer")  # an exact resume replays the same batches


def _batches_before(micro: int, worker: int, workers: int) -> int:
    """Batches logical worker `worker` made for this rank's first `micro` micro-batches."""
    return max(0, (micro - worker + workers - 1) // workers)


class WebDatasetLoader:
    """Iterates one rank's micro-batches ``(images, labels, masks_enc, masks_pred)``; its position
    (``state_dict``/``load_state_dict``) and skip counter (``counters``) follow the batches taken."""

    def __init__(self, plan: ReaderPlan, rank: int, *, batch_size: int, shuffle_buffer: int,
                 transform: Callable, collator: Callable, num_workers: int, pin_memory: bool,
                 start_micro: int = 0, start_epoch: int = 0, accum: int = 1):
        self.plan, self.rank, self.batch_size, self.shuffle_buffer = plan, rank, batch_size, shuffle_buffer
        self.transform, self.collator = transform, collator
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.expected_micro = self.micro = start_micro
        self.accum = accum  # micro-batches per step: the step of start_micro, for a restart's seed
        # Without a saved position (a fresh run, or a checkpoint without one): fresh reader epochs.
        self.readers = self._fresh_readers(start_epoch)
        self.positioned = start_micro == 0

    def _fresh_readers(self, epoch: int) -> list[dict[str, int]]:
        """Every logical worker at the start of reader epoch `epoch`, its batch numbers continuing
        the micro-batch count so that u = c x world + rank goes on."""
        return [{"epoch": epoch, "offset": 0, "batches": _batches_before(self.micro, w, self.plan.workers),
                 "skipped": 0} for w in range(self.plan.workers)]

    def _header(self) -> dict[str, Any]:
        p = self.plan
        return {"format": STATE_FORMAT, "mode": p.mode, "seed": p.seed, "world_size": p.world_size,
                "workers": p.workers, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "num_shards": len(p.shards.urls), "shards": p.shards.fingerprint(), "reseed": p.reseed}

    def local_state(self) -> dict[str, Any]:
        return {"micro_batches": self.micro, "readers": [dict(r) for r in self.readers]}

    def state_dict(self) -> dict[str, Any]:
        """All ranks' positions (a collective call when distributed: every rank must call it)."""
        local = self.local_state()
        ranks: list[dict[str, Any] | None] = [local]
        if self.plan.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * self.plan.world_size
            torch.distributed.all_gather_object(ranks, local)
        return {**self._header(), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpointed state: exactly at the same reader layout, else restarted."""
        header = self._header()
        _refuse_changes(state, header, DATA_KEYS, "resume with the same data.shards, data.wds_mode and meta.seed")
        if any(state.get(key) != header[key] for key in LAYOUT_KEYS):
            self._restart(state)
            return
        _refuse_changes(state, header, REPLAY_KEYS, "an exact resume at the same world size and "
                        "data.num_workers replays the same batches: keep data.batch_size and data.shuffle_buffer")
        ranks = state["ranks"]
        if len(ranks) != self.plan.world_size or ranks[self.rank] is None:
            raise DataError(f"cannot resume the webdataset loader: the checkpoint holds {len(ranks)} ranks' "
                            f"positions, this run has {self.plan.world_size}")
        local = ranks[self.rank]
        if local["micro_batches"] != self.expected_micro:
            raise DataError(f"webdataset loader state is at micro-batch {local['micro_batches']}, the "
                            f"checkpoint step needs {self.expected_micro}")
        self.micro = local["micro_batches"]
        self.readers = [dict(r) for r in local["readers"]]
        self.plan = replace(self.plan, reseed=state.get("reseed"))  # the streams the readers were in
        self.positioned = True

    def _restart(self, state: dict[str, Any]) -> None:
        """Another world size or number of workers: every reader restarts from the one position
        restart.py derives from the checkpoint (the same on every rank), with a warning."""
        old, step = old_plan(self.plan, state), self.expected_micro // max(1, self.accum)
        restart = plan_restart(old, state, step)
        self.plan = replace(self.plan, reseed=restart.reseed)
        self.readers = self._fresh_readers(restart.epoch)
        if self.rank == 0:  # the corrupt samples counted so far: summed over ranks, the count goes on
            self.readers[0]["skipped"] = restart.skipped_corrupt
        self.positioned = True
        message = describe(restart, old, self.plan, step)
        old_samples = int(state["ranks"][0]["micro_batches"]) * int(state["batch_size"]) * old.world_size
        new_samples = self.expected_micro * self.batch_size * self.plan.world_size
        if old_samples != new_samples:
            message += (f"; note that the checkpoint's ranks had taken {old_samples} samples by step {step}, "
                        f"where this run's global batch makes it {new_samples} (set data.global_batch_size)")
        warn(message)

    def counters(self) -> dict[str, int]:
        """Cumulative counts of this rank for logging (summed over ranks by the trainer)."""
        return {"data_skipped": sum(r["skipped"] for r in self.readers)}

    def iter_with_info(self) -> Iterator[tuple[tuple, dict]]:
        """(batch, info) pairs; info: worker, batch, u, epoch/offset after the batch, skipped, keys, cpu_s."""
        if not self.positioned:
            warn(f"data: the checkpoint holds no webdataset loader position; starting every reader "
                 f"at the start of reader epoch {self.readers[0]['epoch']} (micro-batch {self.micro})")
            self.positioned = True
        workers = self.plan.workers
        stream = ShardStream(self.plan, self.rank, self.batch_size, self.shuffle_buffer, self.transform,
                             self.collator, [dict(r) for r in self.readers], rotation=self.micro % workers)
        if self.num_workers:
            stop_workers_at_exit()
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
                            worker_init_fn=ignore_preemption_signals)
        for *batch, info in one_line_errors(loader):
            self._advance(info)
            yield tuple(batch), info

    def _advance(self, info: dict) -> None:
        """Record that the trainer took the batch described by `info`."""
        workers = self.plan.workers
        worker = info["worker"]
        reader = self.readers[worker]
        if worker != self.micro % workers or info["batch"] != reader["batches"]:
            raise RuntimeError(f"webdataset loader out of order: micro-batch {self.micro} came from worker "
                               f"{worker} batch {info['batch']}, expected worker {self.micro % workers} "
                               f"batch {self.readers[self.micro % workers]['batches']}")
        reader.update(epoch=info["epoch"], offset=info["offset"], batches=reader["batches"] + 1,
                      skipped=reader["skipped"] + info["skipped"])
        self.micro += 1

    def __iter__(self) -> Iterator[tuple]:
        return (batch for batch, _ in self.iter_with_info())


def _refuse_changes(state: dict[str, Any], header: dict[str, Any], keys: tuple[str, ...], hint: str) -> None:
    for key in keys:
        if state.get(key) != header[key]:
            raise DataError(f"cannot resume the webdataset loader: its checkpointed {key} is {state.get(key)!r}, "
                            f"this run has {header[key]!r} ({hint})")


def build_wds_loader(shards: ShardSet, transform: Callable, collator: Callable, *, mode: str, batch_size: int,
                     accum: int, world_size: int, rank: int, start_step: int, steps_per_epoch: int, seed: int,
                     num_workers: int, shuffle_buffer: int, pin_memory: bool) -> WebDatasetLoader:
    if mode not in MODES:
        raise ConfigError(f"data.wds_mode {mode!r}: expected one of {', '.join(MODES)}")
    check_readers(shards, mode, world_size, num_workers)
    plan = ReaderPlan(shards, mode, seed, world_size, max(1, num_workers))
    return WebDatasetLoader(plan, rank, batch_size=batch_size, shuffle_buffer=shuffle_buffer, transform=transform,
                            collator=collator, num_workers=num_workers, pin_memory=pin_memory,
                            start_micro=start_step * accum, start_epoch=start_step // max(1, steps_per_epoch),
                            accum=accum)

