"""``data.shards``: from the spec (patterns, lists, index files or folders, pipe: commands) to the
shard list of one trainer epoch, checked up front."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import webdataset as wds

from pijepa.data.shards import INDEX_NAME, read_index
from pijepa.runtime.errors import DataError, DataNotFoundError

WdsMode = Literal["resampled", "finite"]
MODES: tuple[str, ...] = get_args(WdsMode)


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
    items: list[str] = []
    current: list[str] = []
    depth = 0
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
            index = read_index(path)  # a DataError naming the path when it is missing
            root = path if path.is_dir() else path.parent
            return [(str(root / s["name"]), int(s["num_samples"])) for s in index["shards"]]
    try:
        urls = wds.shardlists.expand_urls(item)
    except ValueError as err:  # braceexpand's "unbalanced braces", ...
        raise DataError(f"data.shards: cannot expand {item!r} ({err})") from None
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
        raise DataError(f"data.shards {spec!r} names no shard (expected a pattern such as "
                        f"/data/train-{{000000..000099}}.tar, a list, a shards.json or pipe: commands)")
    missing = [u for u, _ in pairs if not _is_remote(u) and not _local_path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(pairs)})" if len(missing) > 1 else ""
        raise DataNotFoundError(f"data.shards: shard {missing[0]} does not exist{more}")
    urls, counts = zip(*pairs)
    if epoch_samples:
        total = epoch_samples
    elif all(c is not None for c in counts):
        total = sum(c for c in counts if c is not None)
    else:
        unknown = next(u for u, c in pairs if c is None)
        raise DataError(f"data.shards: no sample count for {unknown} (no shards.json lists it); "
                        f"set data.epoch_samples to the number of samples per epoch")
    return ShardSet(tuple(urls), tuple(counts), total, spec)


def check_readers(shards: ShardSet, mode: str, world_size: int, num_workers: int) -> None:
    """finite mode gives every reader (rank x worker) whole shards: it needs one shard per reader."""
    readers = world_size * max(1, num_workers)
    if mode == "finite" and len(shards.urls) < readers:
        raise DataError(
            f"data.wds_mode finite: {len(shards.urls)} shards cannot be split over {world_size} rank(s) x "
            f"{max(1, num_workers)} worker(s) = {readers} readers; use at least {readers} shards, fewer "
            f"data.num_workers, or data.wds_mode=resampled")
