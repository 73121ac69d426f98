"""The training loader for WebDataset shards (``data.dataset: webdataset``), built from webdataset's
pipeline stages (tar reading, shuffle buffer, decode, to_tuple, batched) inside DataLoader workers.

Readers. Rank ``r`` with ``W`` DataLoader workers (1 with ``num_workers: 0``) has ``W`` readers; reader
``(r, w)`` reads its own stream of shards, pass after pass ("reader epochs" ``e = 0, 1, ...``):

* ``finite``: in reader epoch ``e`` the shards are permuted from ``(seed, e)`` and split over all
  ``world x W`` readers (balanced by sample count when ``shards.json`` gives the counts, else
  round-robin), so each reader epoch reads every sample exactly once over all ranks. Readers go
  straight on into their next epoch: batches never drop, pad or repeat a sample. When every reader
  gets the same number of samples, a multiple of ``batch_size``, reader epochs and trainer epochs
  coincide exactly; otherwise a reader's epoch boundary falls inside a batch and readers drift by
  at most about a shard. Needs at least ``world x W`` shards.
* ``resampled``: in reader epoch ``e`` reader ``(r, w)`` draws ``ceil(shards / readers)`` shards
  with replacement from its own stream seeded from ``(seed, e, r, w)``; infinite by nature.

Each reader epoch's samples go through a shuffle buffer seeded from ``(seed, e, r, w)`` that starts
empty and drains at the end of the reader epoch, so a position ``(e, offset)`` (samples out of the
buffer so far) fully determines what comes next. Trainer epochs have ``index num_samples`` (or
``data.epoch_samples``) / global batch steps.

Micro-batch index. DataLoader hands out worker batches round-robin, and every reader stream is
infinite, so this rank's ``c``-th micro-batch is batch ``j`` of logical worker ``w`` with
``c = j * W + w``. The batch carries ``u = c * world + rank``, the same ``u`` the step-addressed
map-style loader uses for micro-batch ``c = step * accum + micro``: masks come from ``(seed, u)``
and the crop of the batch's ``i``-th image from ``(seed, u, i)``, whatever process makes them.

Position and resume. Every batch carries its worker, its batch number, the reader position after
its last sample and the number of samples skipped since the previous batch; the loader records
them as the trainer takes each batch, and ``state_dict()`` (gathered from all ranks) goes into the
checkpoint. On resume each reader replays its current reader epoch from the start through the same
shuffle, dropping the ``offset`` samples already used *before decoding them* (reading their bytes
again: up to one reader epoch of I/O), and DataLoader worker ``i`` plays logical worker
``(i + c) % W`` so that the round-robin continues where it stopped: the resumed run gets exactly
the batches the uninterrupted run would have got.

Corrupt data never stops the run: an undecodable image, a sample without an image or ``cls``, an
unreadable or truncated tar (with ``shards.json`` counts, the missing samples are counted exactly;
without, each read error counts one) are skipped, counted per batch and summed by the loader
(``counters()``, logged as ``data_skipped``), and the first few are reported on stderr.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pijepa.data.folder import as_uint8
from pijepa.data.shards import INDEX_NAME, read_index
from pijepa.runtime.log import warn
from pijepa.runtime.signals import ignore_preemption_signals

WdsMode = Literal["resampled", "finite"]
MODES: tuple[str, ...] = get_args(WdsMode)
STATE_FORMAT = "pijepa-wds-loader-v1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SAMPLE_FIELDS = ("__pos__", "__key__", ";".join(IMAGE_KEYS), "cls")
_TAG_ORDER, _TAG_DRAW, _TAG_SHUFFLE = 1, 2, 3  # keep the seed streams of different uses apart
_MAX_REPORTS = 10  # skipped samples reported on stderr per reader; all are counted
_MAX_EMPTY_EPOCHS = 20  # a reader that reads nothing this often in a row has no readable shard


# ----------------------------------------------------------------------------- shard specs


@dataclass(frozen=True)
class ShardSet:
    """The resolved shard list; ``len()`` is one trainer epoch in samples."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]  # samples per shard where an index says so
    num_samples: int
    spec: str

    def __len__(self) -> int:
        return self.num_samples

    def fingerprint(self) -> str:
        """Shard names (not folders: data may move) of the list, to refuse resuming on other shards."""
        names = "\n".join(re.split(r"[/\s]", u.rstrip(" -"))[-1] for u in self.urls)
        return hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def split_spec(spec: str) -> list[str]:
    """Split a shard spec on commas outside braces and on webdataset's ``::``."""
    items, depth, current = [], 0, []
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [part.strip() for item in items for part in item.split("::") if part.strip()]


def _is_remote(url: str) -> bool:
    """pipe: commands and URLs (s3://, https://, ...) cannot be checked up front; file: and paths can."""
    return url.startswith("pipe:") or bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", url))


def _local_path(url: str) -> Path:
    return Path(url[5:] if url.startswith("file:") else url).expanduser()


@functools.lru_cache(maxsize=64)
def _index_counts(folder: str) -> dict[str, int]:
    """Shard name -> sample count from ``folder/shards.json``, or {} when there is none (or it is
    another tool's file of that name: the counts are only a convenience for patterns)."""
    if not (Path(folder) / INDEX_NAME).is_file():
        return {}
    try:
        return {s["name"]: int(s["num_samples"]) for s in read_index(folder)["shards"]}
    except (ValueError, KeyError, TypeError):
        return {}


def _expand(item: str) -> list[tuple[str, int | None]]:
    """One spec item -> (url, count or None): an index (folder or .json) or a brace pattern."""
    if not _is_remote(item):
        path = _local_path(item)
        if path.is_dir() or path.suffix == ".json":
            index = read_index(path)  # FileNotFoundError naming the path when it is missing
            root = path if path.is_dir() else path.parent
            return [(str(root / s["name"]), int(s["num_samples"])) for s in index["shards"]]
    urls = wds.shardlists.expand_urls(item)
    out = []
    for url in urls:
        count = None
        if not _is_remote(url):
            path = _local_path(url)
            count = _index_counts(str(path.parent.resolve())).get(path.name)
        out.append((url, count))
    return out


def resolve_shards(spec: str, epoch_samples: int = 0) -> ShardSet:
    """Shards of ``data.shards`` (patterns, lists, index files/folders, pipe: commands), local paths
    checked up front; the epoch is ``epoch_samples`` or the indexed total."""
    pairs = [pair for item in split_spec(spec) for pair in _expand(item)]
    if not pairs:
        raise ValueError(f"data.shards {spec!r} names no shard (expected a pattern such as "
                         f"/data/train-{{000000..000099}}.tar, a list, a shards.json or pipe: commands)")
    missing = [u for u, _ in pairs if not _is_remote(u) and not _local_path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(pairs)})" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data.shards: shard {missing[0]} does not exist{more}")
    urls, counts = zip(*pairs)
    if epoch_samples:
        total = epoch_samples
    elif all(c is not None for c in counts):
        total = sum(counts)
    else:
        unknown = next(u for u, c in pairs if c is None)
        raise ValueError(f"data.shards: no sample count for {unknown} (no shards.json lists it); "
                         f"set data.epoch_samples to the number of samples per epoch")
    return ShardSet(tuple(urls), tuple(counts), total, spec)


def check_readers(shards: ShardSet, mode: str, world_size: int, num_workers: int) -> None:
    """finite mode gives every reader (rank x worker) whole shards: it needs one shard per reader."""
    readers = world_size * max(1, num_workers)
    if mode == "finite" and len(shards.urls) < readers:
        raise ValueError(
            f"data.wds_mode finite: {len(shards.urls)} shards cannot be split over {world_size} rank(s) x "
            f"{max(1, num_workers)} worker(s) = {readers} readers; use at least {readers} shards, fewer "
            f"data.num_workers, or data.wds_mode=resampled")


# ----------------------------------------------------------------------------- plans (pure)


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
        heapq.heappush(heap, (total + counts[k], p))
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
            order = np.random.default_rng(mix_seed(self.seed, _TAG_ORDER, epoch)).permutation(n)
            return balanced_split(order.tolist(), self.shards.counts, readers)[rank * self.workers + worker]
        rng = np.random.default_rng(mix_seed(self.seed, _TAG_DRAW, epoch, rank, worker))
        return rng.integers(0, n, size=math.ceil(n / readers)).tolist()

    def epoch_length(self, shards: Sequence[int]) -> int | None:
        counts = [self.shards.counts[k] for k in shards]
        return None if any(c is None for c in counts) else sum(counts)


# ----------------------------------------------------------------------------- decoding


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG (any colour mode, CMYK and greyscale included) or other formats -> uint8 [3, H, W]."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB)
    except RuntimeError:  # not a JPEG after all (a PNG named .jpg, ...)
        return as_uint8(decode_image(raw, mode=ImageReadMode.RGB))


def decode_image_field(key: str, data: bytes) -> torch.Tensor | None:
    """webdataset decoder handler: image extensions only (everything else falls through)."""
    return decode_rgb(data) if key.lstrip(".").lower() in IMAGE_KEYS else None


def crop_seed(seed: int, u: int, i: int) -> int:
    return (seed * 1_000_003 + u) * 1_000_033 + i


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
    """One rank's batches; each DataLoader worker runs one reader (see the module docstring)."""

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
                                          seed=mix_seed(self.plan.seed, _TAG_SHUFFLE, epoch, self.rank, worker)))
            skips.at(epoch, 0)
            index = 0
            for index, sample in enumerate(wds.DataPipeline(*stages), 1):
                skips.at(epoch, index, sample)
                if index > drop:  # the first `drop` were used before the checkpoint: not decoded
                    sample["__pos__"] = (epoch, index)
                    yield sample
            empty = empty + 1 if index == 0 else 0
            if empty >= _MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"webdataset reader (rank {self.rank}, worker {worker}) read no sample in "
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


# ----------------------------------------------------------------------------- main process


def _batches_before(micro: int, worker: int, workers: int) -> int:
    """Batches logical worker `worker` made for this rank's first `micro` micro-batches."""
    return max(0, (micro - worker + workers - 1) // workers)


class WebDatasetLoader:
    """Iterates one rank's micro-batches ``(images, labels, masks_enc, masks_pred)``; its position
    (``state_dict``/``load_state_dict``) and skip counter (``counters``) follow the batches taken."""

    def __init__(self, plan: ReaderPlan, rank: int, *, batch_size: int, shuffle_buffer: int,
                 transform: Callable, collator: Callable, num_workers: int, pin_memory: bool,
                 start_micro: int = 0, start_epoch: int = 0):
        self.plan, self.rank, self.batch_size, self.shuffle_buffer = plan, rank, batch_size, shuffle_buffer
        self.transform, self.collator = transform, collator
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.expected_micro = self.micro = start_micro
        # Without a saved position (a fresh run, or a checkpoint without one): fresh reader epochs.
        self.readers = [{"epoch": start_epoch, "offset": 0, "batches": _batches_before(start_micro, w, plan.workers),
                         "skipped": 0} for w in range(plan.workers)]
        self.positioned = start_micro == 0

    def _header(self) -> dict[str, Any]:
        p = self.plan
        return {"format": STATE_FORMAT, "mode": p.mode, "seed": p.seed, "world_size": p.world_size,
                "workers": p.workers, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "num_shards": len(p.shards.urls), "shards": p.shards.fingerprint()}

    def local_state(self) -> dict[str, Any]:
        return {"micro_batches": self.micro, "readers": [dict(r) for r in self.readers]}

    def state_dict(self) -> dict[str, Any]:
        """All ranks' positions (a collective call when distributed: every rank must call it)."""
        local = self.local_state()
        ranks = [local]
        if self.plan.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * self.plan.world_size
            torch.distributed.all_gather_object(ranks, local)
        return {**self._header(), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        header = self._header()
        for key, value in header.items():
            if state.get(key) != value:
                raise ValueError(f"cannot resume the webdataset loader: its checkpointed {key} is "
                                 f"{state.get(key)!r}, this run has {value!r} (positions are per rank and "
                                 f"worker; resume with the same data settings, world size and data.num_workers)")
        ranks = state["ranks"]
        if len(ranks) != self.plan.world_size or ranks[self.rank] is None:
            raise ValueError(f"cannot resume the webdataset loader: the checkpoint holds {len(ranks)} ranks' "
                             f"positions, this run has {self.plan.world_size}")
        local = ranks[self.rank]
        if local["micro_batches"] != self.expected_micro:
            raise ValueError(f"webdataset loader state is at micro-batch {local['micro_batches']}, the "
                             f"checkpoint step needs {self.expected_micro}")
        self.micro = local["micro_batches"]
        self.readers = [dict(r) for r in local["readers"]]
        self.positioned = True

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
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
                            worker_init_fn=ignore_preemption_signals)
        for *batch, info in loader:
            worker = info["worker"]
            reader = self.readers[worker]
            if worker != self.micro % workers or info["batch"] != reader["batches"]:
                raise RuntimeError(f"webdataset loader out of order: micro-batch {self.micro} came from worker "
                                   f"{worker} batch {info['batch']}, expected worker {self.micro % workers} "
                                   f"batch {self.readers[self.micro % workers]['batches']}")
            reader.update(epoch=info["epoch"], offset=info["offset"], batches=reader["batches"] + 1,
                          skipped=reader["skipped"] + info["skipped"])
            self.micro += 1
            yield tuple(batch), info

    def __iter__(self) -> Iterator[tuple]:
        return (batch for batch, _ in self.iter_with_info())


def build_wds_loader(shards: ShardSet, transform: Callable, collator: Callable, *, mode: str, batch_size: int,
                     accum: int, world_size: int, rank: int, start_step: int, steps_per_epoch: int, seed: int,
                     num_workers: int, shuffle_buffer: int, pin_memory: bool) -> WebDatasetLoader:
    if mode not in MODES:
        raise ValueError(f"data.wds_mode {mode!r}: expected one of {', '.join(MODES)}")
    check_readers(shards, mode, world_size, num_workers)
    plan = ReaderPlan(shards, mode, seed, world_size, max(1, num_workers))
    return WebDatasetLoader(plan, rank, batch_size=batch_size, shuffle_buffer=shuffle_buffer, transform=transform,
                            collator=collator, num_workers=num_workers, pin_memory=pin_memory,
                            start_micro=start_step * accum, start_epoch=start_step // max(1, steps_per_epoch))
