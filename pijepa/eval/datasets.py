"""Labelled image sets for frozen-feature evaluation, in one deterministic order.

Three layouts are read, detected from the path:

* **ImageFolder** -- ``DATA/<class>/<image>`` (images may sit in nested folders);
* **per-class tars** -- ``DATA/<class>.tar`` holding flat image files (the layout of ImageNet-21K
  and of ``shared/data/*/{train,test}``);
* **WebDataset shards** -- a folder holding ``shards.json`` (or that file itself), as written by
  ``pijepa shards write``; the ``jpg`` member of every sample is the image, ``cls`` its class.

Every layout becomes the same thing: a list of byte ranges ``(file, offset, size)`` plus labels,
ordered by class (classes sorted by name, ids ``0..C-1``) and, within a class, by file name. So
the order never depends on the file system, the shard shuffle or the number of processes, and a
per-class-tar folder and the shards written from it give the same samples in the same order.
Images are read by seeking to their byte range, which needs no unpacking and works in DataLoader
workers (each read opens the file itself).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from pijepa.data.decode import decode_rgb
from pijepa.data.shards import INDEX_NAME, detect_layout, read_index, scan_container
from pijepa.runtime.errors import ConfigError, DataError, DataNotFoundError

LAYOUTS = ("imagefolder", "tars", "shards")


class Sample(NamedTuple):
    path: str  # the file holding the bytes: the image itself, a per-class tar or a shard
    offset: int  # where the image's bytes start in `path`
    size: int
    label: int
    name: str  # file name (below the class folder / inside the tar), for messages


@dataclass
class Listing:
    """The images of one split, in evaluation order."""

    samples: list[Sample]
    classes: list[str]
    layout: str
    skipped: int = 0  # files that are not images by extension (reported, never decoded)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples], dtype=torch.long)


def detect_eval_layout(root: Path) -> str:
    """'shards' when ``root`` is (or holds) a shards index, else 'tars' or 'imagefolder'."""
    if (root.is_file() and root.name == INDEX_NAME) or (root / INDEX_NAME).is_file():
        return "shards"
    return detect_layout(root)  # raises a DataError naming both other layouts


def list_images(root: str | os.PathLike) -> Listing:
    """All images under ``root`` in evaluation order (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise DataNotFoundError(f"data {root} does not exist (expected an ImageFolder tree, "
                        f"per-class tars or a WebDataset shards folder with {INDEX_NAME})")
    layout = detect_eval_layout(root)
    if layout == "shards":
        return _list_shards(root)
    return _list_classes(root, layout)


def class_containers(root: Path, layout: str) -> tuple[list[Path], list[str]]:
    """The sorted class tars / folders of a 'tars' or 'imagefolder' root and their class names."""
    if layout == "tars":
        containers = sorted(c for c in root.iterdir() if c.is_file() and c.suffix == ".tar"
                            and not c.name.startswith("."))
        return containers, [c.stem for c in containers]
    containers = sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith("."))
    return containers, [c.name for c in containers]


def scan_class(root: Path, layout: str, container: Path, label: int) -> tuple[list[Sample], int]:
    """(samples sorted by file name, number of non-image files) of one class tar / folder."""
    name = container.stem if layout == "tars" else container.name
    # scan_container lists by byte range and is shared with the shard writer, so "what counts
    # as an image" is the same decision everywhere.
    entries, skips = scan_container((layout, str(container), name, f"{root.name}/{container.name}"))
    return [Sample(e.path, e.offset, e.size, label, e.file) for e in entries], len(skips)


def _list_classes(root: Path, layout: str) -> Listing:
    """ImageFolder or per-class tars; every class folder/tar is a class, even an empty one."""
    containers, classes = class_containers(root, layout)
    samples, skipped = [], 0
    for label, container in enumerate(containers):
        found, skips = scan_class(root, layout, container, label)
        samples += found
        skipped += skips
    return Listing(samples, classes, layout, skipped)


def _list_shards(root: Path) -> Listing:
    """Samples of every shard in the index, re-sorted into class / file order."""
    index = read_index(root)
    folder = root.parent if root.is_file() else root
    classes = [str(c) for c in index["classes"]]
    keyed = []
    for shard in index["shards"]:
        keyed += scan_shard(folder / shard["name"], len(classes))
    # (label, source, file, key): within one source this is the per-class-tar order; the key
    # breaks ties between equally named files of different sources.
    keyed.sort(key=lambda item: item[0])
    return Listing([sample for _, sample in keyed], classes, "shards")


def scan_shard(path: Path, num_classes: int) -> list[tuple[tuple, Sample]]:
    """(sort key, Sample) for each sample of one shard, reading only headers, cls and json."""
    if not path.is_file():
        raise DataError(f"shard {path} listed in its {INDEX_NAME} is missing")
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    out = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = Path(m.name).name.partition(".")
            members.setdefault(key, {})[ext] = m
        for key, parts in members.items():
            if "jpg" not in parts or "cls" not in parts:
                raise DataError(f"{path}: sample {key!r} lacks a jpg or cls member "
                                f"(has {sorted(parts)}); rewrite it with `pijepa shards write`")
            label = int(_member_bytes(tf, parts["cls"]).decode("ascii"))
            if not 0 <= label < num_classes:
                raise DataError(f"{path}: sample {key!r} has class {label}, outside the "
                                f"{num_classes} classes of the index")
            info = json.loads(_member_bytes(tf, parts["json"])) if "json" in parts else {}
            file, source = str(info.get("file", key)), str(info.get("source", ""))
            jpg = parts["jpg"]
            out.append(((label, source, file, key), Sample(str(path), jpg.offset_data, jpg.size, label, file)))
    return out


def _member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = tf.extractfile(member)
    if data is None:  # cannot happen: scan_shard keeps regular files only
        raise ValueError(f"{member.name} is not a regular file")
    return data.read()


def limit_samples(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` samples, taken round-robin over classes (the first images of each class).

    Taking the first ``limit`` of the class-sorted list would keep only the first classes; this
    keeps every class represented and stays in evaluation order.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    seen: dict[int, int] = {}
    rank_in_class = []
    for s in samples:
        rank_in_class.append(seen.get(s.label, 0))
        seen[s.label] = rank_in_class[-1] + 1
    order = sorted(range(len(samples)), key=lambda i: (rank_in_class[i], samples[i].label))
    keep = sorted(order[:limit])
    return [samples[i] for i in keep]


def read_bytes(sample: Sample) -> bytes:
    with open(sample.path, "rb") as f:
        f.seek(sample.offset)
        data = f.read(sample.size)
    if len(data) != sample.size:
        raise DataError(f"{sample.path}: expected {sample.size} bytes of {sample.name} at offset "
                        f"{sample.offset}, got {len(data)} (did the file change?)")
    return data


def decode_sample(sample: Sample) -> torch.Tensor:
    """uint8 RGB [3, H, W] of one sample (greyscale and CMYK converted); one DataError line if not an image."""
    return decode_rgb(read_bytes(sample), f"{sample.path}: {sample.name}")


class EvalImages(Dataset):
    """Map-style dataset over a list of samples: ``(transform(image), label)``."""

    def __init__(self, samples: list[Sample], transform: Callable | None = None):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = decode_sample(sample)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label
