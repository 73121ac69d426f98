"""Writing the shards: each one whole by one worker (atomically, hashed while it streams), its
record in ``parts/``, and the index once every shard is there; see :mod:`pijepa.data.shards`."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm
from webdataset import TarWriter  # (imports torch) imported here so forked workers inherit it

from pijepa.data.images import UndecodableImage, prepare_image, strict_decoding
from pijepa.data.shards.index import (
    INDEX_FORMAT,
    INDEX_NAME,
    PARTS_DIR,
    PLAN_FORMAT,
    PLAN_NAME,
    SKIPPED_NAME,
    TRANSCODED_NAME,
    ShardsError,
    write_json,
)
from pijepa.data.shards.plan import ShardTask, check_plan, listing_fingerprint, plan_tasks, sample_json
from pijepa.data.shards.sources import Entry, class_jobs, detect_layout, normalize_sources, scan_container, skip_record
from pijepa.runtime.atomic import atomic_write

# Fixed tar metadata: this is what makes reruns byte-identical (TarWriter's default mtime is now()).
TAR_MTIME, TAR_MODE, TAR_USER = 0, 0o444, "pijepa"


# ----------------------------------------------------------------------------- one shard


def _read_bytes(e: Entry) -> bytes:
    with open(e.path, "rb") as f:
        f.seek(e.offset)
        data = f.read(e.size)
    if len(data) != e.size:
        raise OSError(f"{e.path}: expected {e.size} bytes at offset {e.offset}, got {len(data)} (source changed?)")
    return data


class _ShardSink:
    """One shard's tar stream: the sha256 and size come for free while tarfile streams through this
    file wrapper, and the samples written, skipped and transcoded are recorded on the way."""

    def __init__(self, task: ShardTask) -> None:
        self.task, self.sha, self.bytes, self.count = task, hashlib.sha256(), 0, 0
        self.skipped: list[dict] = []
        self.transcoded: list[dict] = []
        self.raw: IO[bytes] | None = None

    def write(self, data: bytes) -> int:
        assert self.raw is not None, "the TarWriter inside fill() is the only writer"
        self.sha.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def fill(self, raw: IO[bytes]) -> None:
        """atomic_write's callback: every sample of the task, in shard order, into `raw`."""
        self.raw = raw
        with TarWriter(self, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False) as tw:
            for e, key, class_id in self.task.samples:
                try:
                    payload, note = prepare_image(_read_bytes(e), self.task.reencode)
                except UndecodableImage as err:
                    self.skipped.append(skip_record(e, str(err)))
                    continue
                if note:
                    self.transcoded.append(skip_record(e, note))
                tw.write({"__key__": key, "cls": str(class_id).encode("ascii"), "jpg": payload,
                          "json": sample_json(e, class_id)})
                self.count += 1


def write_shard(task: ShardTask) -> dict:
    """Write one whole shard (`name.tar.tmp`, then renamed) and its record in parts/; returns the record."""
    out = Path(task.out_dir)
    sink = _ShardSink(task)
    with strict_decoding():
        atomic_write(out / task.name, sink.fill)
    record = {"name": task.name, "digest": task.digest, "num_samples": sink.count, "bytes": sink.bytes,
              "sha256": sink.sha.hexdigest(), "skipped": sink.skipped, "transcoded": sink.transcoded}
    write_json(out / PARTS_DIR / f"{task.name}.json", record)
    return record


def count_tar_samples(path: Path) -> int:
    """Distinct keys in a shard (reads headers only)."""
    with tarfile.open(path, "r:") as tf:
        return len({m.name.split(".", 1)[0] for m in tf if m.isfile()})


def _load_done_record(out: Path, name: str, digest: str) -> dict | None:
    """The part record of a finished shard whose file still matches it, else None (rewrite it)."""
    final, part = out / name, out / PARTS_DIR / f"{name}.json"
    if not (final.is_file() and part.is_file()):
        return None
    try:
        record = json.loads(part.read_text(encoding="utf-8"))
        ok = (record.get("digest") == digest and final.stat().st_size == record.get("bytes")
              and count_tar_samples(final) == record.get("num_samples"))
    except (OSError, ValueError, AttributeError, tarfile.TarError):
        return None
    return record if ok else None


# ----------------------------------------------------------------------------- driver


def _pool(workers: int) -> Any:
    if workers <= 1:
        return None
    # fork: workers start instantly (a spawned worker would re-import torch via webdataset, ~2 s).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def _imap(pool: Any, fn: Callable, items: Sequence, ordered: bool = True) -> Iterator:
    if pool is None:
        return map(fn, items)
    return (pool.imap if ordered else pool.imap_unordered)(fn, items, chunksize=1)


def _validate(samples_per_shard: int | None, max_shard_bytes: int, workers: int, prefix: str, seed: int) -> None:
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ShardsError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes < 1:
        raise ShardsError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if workers < 1:
        raise ShardsError(f"workers must be >= 1, got {workers}")
    if seed < 0:
        raise ShardsError(f"seed must be >= 0, got {seed}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        raise ShardsError(f"prefix {prefix!r} must be a plain file-name prefix ([A-Za-z0-9_.-])")


def _scan(sources: Sequence[Path], layouts: Sequence[str], pool: Any,
          progress: bool) -> tuple[list[Entry], list[str], list[dict]]:
    """All images in listing order (sources, classes, files sorted), the class names, the strays."""
    jobs, skipped = [], []
    for src, layout in zip(sources, layouts):
        src_jobs, stray = class_jobs(src, layout)
        jobs += src_jobs
        skipped += stray
    entries: list[Entry] = []
    bar = tqdm(_imap(pool, scan_container, jobs), total=len(jobs), desc="scanning", unit="class", disable=not progress)
    for found, not_images in bar:
        entries += found
        skipped += not_images
    if not entries:
        raise ShardsError(f"no images found in {', '.join(map(str, sources))}")
    return entries, sorted({job[2] for job in jobs}), skipped


def _write_pending(out: Path, tasks: Sequence[ShardTask], resuming: bool, pool: Any, progress: bool) -> list[dict]:
    """Write the shards not already done; return every shard's record, in shard order."""
    done = {t.name: _load_done_record(out, t.name, t.digest) for t in tasks} if resuming else {}
    records = {name: record for name, record in done.items() if record is not None}
    todo = [t for t in tasks if t.name not in records]
    if todo:
        (out / INDEX_NAME).unlink(missing_ok=True)  # the index exists only for a complete set
    if resuming:
        # stdout, as the summary line below: the command's own report (the logger is for stderr)
        print(f"pijepa shards: resuming in {out}: {len(tasks) - len(todo)} of {len(tasks)} shards already written")
    planned = {t.name: len(t.samples) for t in todo}
    with tqdm(total=sum(planned.values()), desc="writing shards", unit="img", disable=not progress) as bar:
        for record in _imap(pool, write_shard, todo, ordered=False):
            records[record["name"]] = record
            bar.update(planned[record["name"]])
    return [records[t.name] for t in tasks]


def _convert(sources: list[Path], layouts: list[str], out: Path, settings: dict, pool: Any,
             progress: bool) -> tuple[list[str], list[dict], list[dict]]:
    """Scan, plan, check the plan against `out` and write what is missing: (classes, scan skips,
    every shard's record)."""
    entries, classes, scan_skipped = _scan(sources, layouts, pool, progress)
    tasks = plan_tasks(entries, classes, out, seed=settings["seed"], samples_per_shard=settings["samples_per_shard"],
                       max_shard_bytes=settings["max_shard_bytes"], reencode=settings["reencode"],
                       prefix=settings["prefix"])
    plan = {"format": PLAN_FORMAT, "settings": settings,
            "listing_sha256": listing_fingerprint(entries, classes, scan_skipped),
            "num_samples_planned": len(entries),
            "shards": [{"name": t.name, "num_samples": len(t.samples), "digest": t.digest} for t in tasks]}
    del entries  # the tasks hold what is needed; ImageNet-22K listings are large
    out.mkdir(parents=True, exist_ok=True)
    resuming = check_plan(out, plan, settings["prefix"])
    (out / PARTS_DIR).mkdir(exist_ok=True)
    write_json(out / PLAN_NAME, plan)
    return classes, scan_skipped, _write_pending(out, tasks, resuming, pool, progress)


def _finish(out: Path, settings: dict, layouts: list[str], classes: list[str], scan_skipped: list[dict],
            records: list[dict]) -> dict:
    """The reports and, last, the index: its presence marks a complete conversion."""
    skipped = scan_skipped + [s for r in records for s in r["skipped"]]
    transcoded = [s for r in records for s in r["transcoded"]]
    index = {
        "format": INDEX_FORMAT,
        "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in records],
        "classes": classes,
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "num_samples": sum(r["num_samples"] for r in records),
        "num_classes": len(classes),
        "seed": settings["seed"],
        **{k: settings[k] for k in ("prefix", "samples_per_shard", "max_shard_bytes", "reencode")},
        "sources": [{"path": s, "layout": layout} for s, layout in zip(settings["sources"], layouts)],
        "skipped": len(skipped),
        "transcoded": len(transcoded),
    }
    write_json(out / SKIPPED_NAME, skipped)
    write_json(out / TRANSCODED_NAME, transcoded)
    write_json(out / INDEX_NAME, index)  # last: its presence marks a complete conversion
    print(f"pijepa shards: wrote {index['num_samples']} images of {len(classes)} classes in {len(records)} shards "
          f"({sum(r['bytes'] for r in records) / 1e9:.2f} GB) to {out}; skipped {len(skipped)} "
          f"(listed in {out / SKIPPED_NAME}); transcoded {len(transcoded)} non-JPEG")
    return index


def write_shards(
    src: Sequence[Path | str] | Path | str,
    out: Path | str,
    *,
    samples_per_shard: int | None = None,
    max_shard_bytes: int = 1_000_000_000,
    seed: int = 0,
    workers: int = 1,
    reencode: bool = False,
    prefix: str = "train",
    progress: bool = True,
) -> dict:
    """Convert `src` (one or several sources) into shuffled WebDataset shards in `out`; returns the index."""
    sources = normalize_sources(src)
    _validate(samples_per_shard, max_shard_bytes, workers, prefix, seed)
    layouts = [detect_layout(s) for s in sources]  # fail before touching `out`
    out = Path(out).expanduser().resolve()
    if out in sources or any(s in out.parents for s in sources):
        raise ShardsError(f"--out {out} must not be inside a source folder")
    settings = {"sources": [str(s) for s in sources], "samples_per_shard": samples_per_shard,
                "max_shard_bytes": max_shard_bytes, "seed": seed, "reencode": reencode, "prefix": prefix}
    pool = _pool(workers)  # created before any tqdm thread exists (fork safety)
    try:
        classes, scan_skipped, records = _convert(sources, layouts, out, settings, pool, progress)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return _finish(out, settings, layouts, classes, scan_skipped, records)
