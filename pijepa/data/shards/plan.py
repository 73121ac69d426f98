"""Planning a conversion before anything is written: sample keys, exact tar sizes, shard
boundaries and digests, and whether an output folder holds an earlier run of the same plan."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pijepa.data.shards.index import PLAN_NAME, ShardsError
from pijepa.data.shards.sources import Entry

TAR_BLOCK, TAR_RECORD = 512, 10240
MAX_KEY_LEN = 80  # "<key>.json" fits one 100-byte name field: no extra pax header, exact size estimates


class ShardTask(NamedTuple):
    out_dir: str
    name: str
    digest: str
    reencode: bool
    samples: list[tuple[Entry, str, int]]  # (entry, key, class id) in shard order


def _sanitize(text: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-") or "sample"
    if len(key) > MAX_KEY_LEN:  # keep it short but unique: a hash of the full text replaces the tail
        key = key[: MAX_KEY_LEN - 9] + "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def _key_candidate(e: Entry, level: int) -> str:
    """Ever more specific keys: file stem, then class + path, then source + path."""
    rel_stem = str(Path(e.file).with_suffix(""))
    if level == 0:
        return _sanitize(Path(e.file).stem)
    if level == 1:
        return _sanitize(f"{e.class_name}_{rel_stem}")
    return _sanitize(f"{e.source.removesuffix('.tar')}_{rel_stem}")


def unique_keys(entries: Sequence[Entry]) -> list[str]:
    """Readable, unique `__key__`s: the file stem unless it collides (CIFAR splits reuse names)."""
    keys = [_key_candidate(e, 0) for e in entries]
    for level in (1, 2):
        counts = Counter(keys)
        clashes = [i for i, k in enumerate(keys) if counts[k] > 1]
        if not clashes:
            break
        for i in clashes:
            keys[i] = _key_candidate(entries[i], level)
    used: set[str] = set()
    for i, key in enumerate(keys):  # last resort, in listing order: numbered suffixes
        base, n = key, 2
        while key in used:
            key, n = f"{base}-{n}", n + 1
        used.add(key)
        keys[i] = key
    return keys


def sample_json(e: Entry, class_id: int) -> bytes:
    record = {"class_id": class_id, "class_name": e.class_name, "file": e.file, "source": e.source}
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sample_tar_bytes(image_bytes: int, json_bytes: int, cls_bytes: int) -> int:
    """Exact tar bytes of one sample (header + padded data for cls, jpg, json)."""
    return _member_bytes(cls_bytes) + _member_bytes(image_bytes) + _member_bytes(json_bytes)


def shard_counts(sample_bytes: Sequence[int], samples_per_shard: int | None, max_shard_bytes: int) -> list[int]:
    """Samples per shard, in order: fixed counts, or greedy fill so that no shard exceeds the limit
    (a single sample bigger than the limit gets a shard of its own)."""
    n = len(sample_bytes)
    if samples_per_shard is not None:
        full, rest = divmod(n, samples_per_shard)
        return [samples_per_shard] * full + ([rest] if rest else [])
    budget = max_shard_bytes - 2 * TAR_BLOCK - TAR_RECORD  # end-of-archive blocks + record padding
    counts, count, used = [], 0, 0
    for b in sample_bytes:
        if count and used + b > budget:
            counts.append(count)
            count, used = 0, 0
        count, used = count + 1, used + b
    if count:
        counts.append(count)
    return counts


def _digest(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def listing_fingerprint(entries: Sequence[Entry], classes: Sequence[str], stray: Sequence[dict]) -> str:
    rows = (f"{e.path}\t{e.offset}\t{e.size}\t{e.mtime_ns}\t{e.class_name}\t{e.file}" for e in entries)
    extra = [json.dumps(list(classes))] + [json.dumps(s, sort_keys=True) for s in stray]
    return _digest([*rows, *extra])


def shard_digest(samples: Sequence[tuple[Entry, str, int]]) -> str:
    return _digest(f"{key}\t{e.path}\t{e.offset}\t{e.size}\t{cid}" for e, key, cid in samples)


def plan_tasks(entries: Sequence[Entry], classes: Sequence[str], out: Path, *, seed: int, samples_per_shard: int | None,
               max_shard_bytes: int, reencode: bool, prefix: str) -> list[ShardTask]:
    """The whole assignment of samples to shards, fixed before anything is written."""
    class_to_idx = {c: i for i, c in enumerate(classes)}
    keys = unique_keys(entries)
    order = np.random.default_rng(seed).permutation(len(entries))
    shuffled = [(entries[i], keys[i], class_to_idx[entries[i].class_name]) for i in order]
    sizes = [sample_tar_bytes(e.size, len(sample_json(e, c)), len(str(c))) for e, _, c in shuffled]
    tasks, start = [], 0
    for i, n in enumerate(shard_counts(sizes, samples_per_shard, max_shard_bytes)):
        chunk = shuffled[start : start + n]
        tasks.append(ShardTask(str(out), f"{prefix}-{i:06d}.tar", shard_digest(chunk), reencode, chunk))
        start += n
    return tasks


def check_plan(out: Path, plan: dict, prefix: str) -> bool:
    """True when resuming an earlier run of the same plan; raise when `out` holds something else."""
    path = out / PLAN_NAME
    if not path.exists():
        if any(out.glob(f"{prefix}-*.tar")):
            raise ShardsError(f"{out} already holds {prefix}-*.tar shards but no {PLAN_NAME}; use an empty --out")
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardsError(f"cannot read {path} ({err}); delete it or use another --out") from err
    if old == plan:
        return True
    before = old.get("settings", {}) if isinstance(old, dict) else {}
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in plan["settings"].items() if before.get(k) != v]
    if not changed:
        changed = ["the source files changed since that run"]
    raise ShardsError(
        f"{out} holds a conversion with other settings ({'; '.join(changed)}); refusing to resume -- "
        f"rerun with the same settings, or use another --out (or delete {out})"
    )
