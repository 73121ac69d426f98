"""The worker side of the webdataset loader: one reader's samples (tar reading, shuffle buffer,
decode, skips counted) made into batches; see :mod:`pijepa.data.wds`."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pijepa.data.decode import decode_rgb
from pijepa.data.transforms import crop_seed
from pijepa.data.wds.plan import ReaderPlan
from pijepa.runtime.errors import DataError
from pijepa.runtime.log import warn

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SAMPLE_FIELDS = ("__pos__", "__key__", ";".join(IMAGE_KEYS), "cls")
_MAX_REPORTS = 10  # skipped samples reported on stderr per reader; all are counted
_MAX_EMPTY_EPOCHS = 20  # a reader that reads nothing this often in a row has no readable shard


# ----------------------------------------------------------------------------- decoding


def decode_image_field(key: str, data: bytes) -> torch.Tensor | None:
    """webdataset decoder handler: image extensions only (everything else falls through)."""
    return decode_rgb(data, key) if key.lstrip(".").lower() in IMAGE_KEYS else None


# ----------------------------------------------------------------------------- reading


class SkipLog:
    """A reader's skipped samples, keyed by the position of the sample they precede or are, so that
    each is counted with exactly one batch; positions at or before ``resume`` were counted before
    the checkpoint and are replayed silently."""

    def __init__(self, worker: int, resume: tuple[int, int]):
        self.worker, self.resume = worker, resume
        self.pos, self.url, self.key = (resume[0], 0), "", ""
        self.pending: list[tuple[tuple[int, int], int]] = []
        self.reported = 0

    def at(self, epoch: int, index: int, sample: dict | None = None) -> None:
        self.pos = (epoch, index)
        if sample is not None:
            self.url, self.key = sample.get("__url__", ""), sample.get("__key__", "")

    def record(self, where: tuple[int, int], count: int, reason: str) -> None:
        if where <= self.resume or count <= 0:
            return
        self.pending.append((where, count))
        self.reported += 1
        if self.reported <= _MAX_REPORTS:
            tail = " (further skips of this reader are counted, not reported)" if self.reported == _MAX_REPORTS else ""
            warn(f"data: skipped {count} sample(s) [reader worker {self.worker}]: {reason}{tail}", all_ranks=True)

    def sample_error(self, exn: Exception) -> bool:
        """webdataset handler for decode/to_tuple: the failing sample is the last one read."""
        cause = exn.__cause__ or exn
        self.record(self.pos, 1, f"{self.key} in {self.url}: {type(cause).__name__}: {cause}")
        return True  # skip it and go on

    def read_error(self, url: str, lost: int, errors: list[Exception]) -> None:
        first = errors[0] if errors else None
        why = f"{type(first).__name__}: {first.args[0] if first.args else first}" if first else "ends early"
        self.record((self.pos[0], self.pos[1] + 1), lost, f"shard {url} unreadable or truncated ({why})")

    def take(self, until: tuple[int, int]) -> int:
        done = sum(n for where, n in self.pending if where <= until)
        self.pending = [(where, n) for where, n in self.pending if where > until]
        return done


def _tar_samples(skips: SkipLog) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Pipeline stage: shard dicts -> samples, one shard at a time so that losses are counted per
    shard (tarfile's stream mode may stop silently at a truncation: the index count tells)."""

    def stage(shards: Iterator[dict]) -> Iterator[dict]:
        for shard in shards:
            errors: list[Exception] = []
            read = wds.tarfile_to_samples(handler=lambda exn, errors=errors: errors.append(exn) or True)
            n = 0
            for sample in read(iter([{"url": shard["url"]}])):
                n += 1
                yield sample
            expected = shard["count"]
            lost = expected - n if expected is not None and n < expected else 0
            if errors or lost:
                skips.read_error(shard["url"], max(lost, 1 if errors else 0), errors)

    return stage


# ----------------------------------------------------------------------------- worker side


class _BatchMaker:
    """``wds.batched`` collation: seeded crops, the mask collator, and the batch's bookkeeping."""

    def __init__(self, stream: ShardStream, worker: int, first_batch: int, skips: SkipLog):
        self.s, self.worker, self.j, self.skips = stream, worker, first_batch, skips

    def __call__(self, samples: list[tuple]) -> tuple:
        s = self.s
        c = self.j * s.plan.workers + self.worker  # this rank's micro-batch number
        u = c * s.plan.world_size + s.rank
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched (num_workers 0)
            items = []
            for i, (_pos, _key, image, label) in enumerate(samples):
                # the CPU generator only: torch.manual_seed also queues a CUDA seeding call and
                # formats a stack trace for it while CUDA is uninitialised (0.4-2 ms per call)
                torch.default_generator.manual_seed(crop_seed(s.plan.seed, u, i))
                items.append((u, s.transform(image), label))
        images, labels, masks_enc, masks_pred = s.collator(items)
        end = samples[-1][0]
        info = {"worker": self.worker, "batch": self.j, "u": u, "epoch": end[0], "offset": end[1],
                "skipped": self.skips.take(end), "keys": [x[1] for x in samples],
                "cpu_s": time.process_time()}  # the worker's CPU clock, for `pijepa bench data`
        self.j += 1
        return images, labels, masks_enc, masks_pred, info


class ShardStream(IterableDataset):
    """One rank's batches; each DataLoader worker runs one reader (see :mod:`pijepa.data.wds`)."""

    def __init__(self, plan: ReaderPlan, rank: int, batch_size: int, shuffle_buffer: int,
                 transform: Callable, collator: Callable, starts: list[dict], rotation: int):
        super().__init__()
        self.plan, self.rank, self.batch_size, self.shuffle_buffer = plan, rank, batch_size, shuffle_buffer
        self.transform, self.collator = transform, collator
        self.starts, self.rotation = starts, rotation

    def _raw(self, worker: int, start: dict, skips: SkipLog) -> Iterator[dict]:
        """Samples of reader epochs start["epoch"], ... out of the shuffle buffer, positioned."""
        epoch, empty = start["epoch"], 0
        while True:
            shards = self.plan.epoch_shards(epoch, self.rank, worker)
            drop = start["offset"] if epoch == start["epoch"] else 0
            if drop and drop == self.plan.epoch_length(shards):  # finished exactly: nothing to replay
                epoch += 1
                continue
            listed = [{"url": self.plan.shards.urls[k], "count": self.plan.shards.counts[k]} for k in shards]
            stages: list[Any] = [functools.partial(iter, listed), _tar_samples(skips)]
            if self.shuffle_buffer > 1:
                stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                          seed=self.plan.shuffle_seed(epoch, self.rank, worker)))
            skips.at(epoch, 0)
            index = 0
            for index, sample in enumerate(wds.DataPipeline(*stages), 1):
                skips.at(epoch, index, sample)
                if index > drop:  # the first `drop` were used before the checkpoint: not decoded
                    sample["__pos__"] = (epoch, index)
                    yield sample
            empty = empty + 1 if index == 0 else 0
            if empty >= _MAX_EMPTY_EPOCHS:
                raise DataError(f"webdataset reader (rank {self.rank}, worker {worker}) read no sample in "
                                f"{empty} reader epochs in a row: its shards are unreadable "
                                f"(e.g. {self.plan.shards.urls[shards[0]] if shards else 'none'})")
            epoch += 1

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.plan.workers
        start = self.starts[worker]
        skips = SkipLog(worker, (start["epoch"], start["offset"]))
        pipeline = wds.DataPipeline(
            functools.partial(self._raw, worker, start, skips),
            # only images and cls are decoded (never pickles or other payloads a shard may hold)
            wds.decode(decode_image_field, only=[*IMAGE_KEYS, "cls"], handler=skips.sample_error),
            wds.to_tuple(*SAMPLE_FIELDS, handler=skips.sample_error),
            wds.batched(self.batch_size, collation_fn=_BatchMaker(self, worker, start["batches"], skips),
                        partial=False),
        )
        return iter(pipeline)

