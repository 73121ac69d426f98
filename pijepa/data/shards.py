"""`pijepa shards write`: pack an image-classification dataset into shuffled WebDataset shards.

Sources (one or more ``--src``; the layout is detected per source):

* **per-class tars** -- ``SRC/<class>.tar`` holding flat image files, as in the official
  ImageNet-21K/22K release (``n01440764.tar`` -> ``n01440764_10026.JPEG`` ...);
* **ImageFolder** -- ``SRC/<class>/<file>.jpg`` (files may sit in nested folders).

With several sources (e.g. split folders) the classes are the sorted union of all class names, so
the same classes always get the same ids ``0..C-1``. Class folders/tars count as classes even when
they hold no image. Names starting with ``.`` (``.DS_Store``, ``.ipynb_checkpoints``, macOS ``._x``
AppleDouble members) are tool metadata and are ignored everywhere; every other file that does not
become a sample is listed in ``skipped.json``.

Output in ``OUT``:

* ``{prefix}-{index:06d}.tar`` -- samples of a single global permutation of all images
  (``numpy.random.default_rng(seed).permutation``), each with the keys of the public ImageNet-22K
  WebDataset shards: ``__key__`` (from the file name, ``[A-Za-z0-9_-]`` only, unique), ``cls``
  (class id as ASCII), ``jpg`` and ``json`` (``{"class_id", "class_name", "file", "source"}``, where
  ``file`` is the tar member name or the path below the class folder and ``source`` is
  ``<src folder>/<class>.tar`` or ``<src folder>/<class>``).
* ``shards.json`` -- the index (format ``pijepa-shards-v1``), written atomically at the very end:
  its presence means the conversion is complete. Read it with :func:`read_index`.
* ``skipped.json`` -- ``[{"file", "source", "class_name", "reason"}]`` for every file left out;
  ``transcoded.json`` -- the same for non-JPEG images that were converted (see below).
* ``plan.json`` and ``parts/<shard>.json`` -- resume bookkeeping (settings, listing fingerprint,
  per-shard digests; per-shard result records).

Image policy (what an ImageNet user expects; it is also what the widely used TF ImageNet build
script does with the one PNG and the CMYK JPEGs hidden among ImageNet's ``.JPEG`` files):

* every image is fully decoded with PIL before it is written; undecodable files (truncated JPEGs,
  text named ``.jpg``, ...) are skipped, listed in ``skipped.json`` and counted in the index;
* without ``reencode``, JPEG files (any colour mode, CMYK and greyscale included) keep their
  original bytes under ``jpg`` -- loaders must ``convert("RGB")``, as torchvision's ImageFolder
  loader does; other formats (PNG disguised as ``.JPEG``, BMP, WebP, ...) are the rare exception:
  they are converted to RGB JPEG (quality 95) so that every sample has a JPEG under ``jpg`` (keys
  such as ``png`` would break loaders that select ``jpg``), and listed in ``transcoded.json``;
* with ``reencode=True`` every image is decoded and re-encoded as RGB JPEG (quality 95): CMYK,
  greyscale and palette images are converted, alpha is composited onto white. EXIF orientation is
  not applied (pixels stay as PIL/torchvision loaders see them in the original file).

Determinism: shard boundaries are planned from file sizes before anything is written (a count per
shard with ``samples_per_shard``, else greedily up to ``max_shard_bytes`` from the exact tar sizes
of the original bytes; re-encoding or skipped files make a shard a little smaller), so the shards
are written in parallel, each whole by one worker, and the result does not depend on ``workers``.
The shards are written with webdataset's ``TarWriter`` (one per shard: ``ShardWriter`` decides
boundaries itself, sequentially, and writes the final names directly), which is reproducible once
``mtime`` is fixed: it sorts each sample's keys, writes tarfile's default POSIX (pax) headers with
uid/gid 0 (its ``format`` argument is not passed on to tarfile) and takes mode and user/group names
from its arguments -- all fixed below. Reruns are byte-identical.

Resume: each shard is written to ``name.tar.tmp`` then renamed, and its record goes to
``parts/``. A rerun with the same settings and unchanged sources skips shards whose file and record
agree (digest, size and sample count); a rerun with other settings is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm
from webdataset import TarWriter  # (imports torch) imported here so forked workers inherit it

from pijepa.runtime.errors import DataError

INDEX_FORMAT = "pijepa-shards-v1"
PLAN_FORMAT = "pijepa-shards-plan-v1"
INDEX_NAME, PLAN_NAME, PARTS_DIR = "shards.json", "plan.json", "parts"
SKIPPED_NAME, TRANSCODED_NAME = "skipped.json", "transcoded.json"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp"})
JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: camera JPEGs with extra frames, still plain JPEG
JPEG_QUALITY = 95
LAYOUTS = "per-class tars (SRC/<class>.tar holding image files) or an ImageFolder tree (SRC/<class>/<image>)"
# Fixed tar metadata: this is what makes reruns byte-identical (TarWriter's default mtime is now()).
TAR_MTIME, TAR_MODE, TAR_USER = 0, 0o444, "pijepa"
TAR_BLOCK, TAR_RECORD = 512, 10240
MAX_KEY_LEN = 80  # "<key>.json" fits one 100-byte name field: no extra pax header, exact size estimates


class ShardsError(DataError):
    """A user-facing problem (bad source, conflicting output folder...): the message says what to do."""


class Entry(NamedTuple):
    """One source image, located by byte range so that workers can read it without unpacking tars."""

    path: str  # the tar that holds the image, or the image file itself
    offset: int  # where the bytes start inside `path` (0 for plain files)
    size: int
    mtime_ns: int  # of `path`; part of the listing fingerprint, so a changed source blocks resume
    class_name: str
    file: str  # tar member name, or path below the class folder
    source: str  # "<src folder>/<class>.tar" or "<src folder>/<class>"


class ShardTask(NamedTuple):
    out_dir: str
    name: str
    digest: str
    reencode: bool
    samples: list[tuple[Entry, str, int]]  # (entry, key, class id) in shard order


# ----------------------------------------------------------------------------- small helpers


def parse_size(text: str | int) -> int:
    """'1GB' -> 10**9, '512MiB' -> 512 * 2**20, '1e9' -> 10**9 (decimal units, as disk vendors use)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 1GB, 500MB, 2GiB, 1e9)")
    try:
        number, unit, binary = float(match[1]), match[2].upper(), bool(match[3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 1GB, 500MB, 2GiB, 1e9)") from None
    power = " KMGT".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in Path(name).parts if part not in (".", ".."))


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _skip_record(e: Entry | None, reason: str, *, file: str = "", source: str = "", class_name: str = "") -> dict:
    if e is not None:
        file, source, class_name = e.file, e.source, e.class_name
    return {"file": file, "source": source, "class_name": class_name, "reason": reason}


@contextmanager
def _strict_decoding() -> Iterator[None]:
    # Some code sets PIL's global LOAD_TRUNCATED_IMAGES; a truncated file must still fail here.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


# ----------------------------------------------------------------------------- sources


def detect_layout(src: Path) -> str:
    """'tars' or 'imagefolder'; anything else raises ShardsError naming `src` and both layouts."""
    if not src.exists():
        raise ShardsError(f"source {src} does not exist; expected {LAYOUTS}")
    if not src.is_dir():
        raise ShardsError(f"source {src} is not a folder; expected {LAYOUTS}")
    children = [c for c in sorted(src.iterdir()) if not c.name.startswith(".")]
    tars = [c for c in children if c.is_file() and c.suffix == ".tar"]
    dirs = [c for c in children if c.is_dir()]
    if tars and dirs:
        raise ShardsError(f"source {src} holds both .tar files and folders; expected only one of {LAYOUTS}")
    if tars:
        return "tars"
    if dirs:
        inner = [c for c in dirs[0].iterdir() if not c.name.startswith(".")]
        if any(c.suffix == ".tar" for c in inner) and not any(c.suffix.lower() in IMAGE_EXTENSIONS for c in inner):
            raise ShardsError(
                f"source {src} looks like a folder of splits ({dirs[0].name}/ holds .tar files); "
                f"pass each split folder as its own --src; expected {LAYOUTS}"
            )
        return "imagefolder"
    raise ShardsError(f"source {src} holds neither per-class .tar files nor class folders; expected {LAYOUTS}")


def _candidate(name: str, size: int, e_args: tuple) -> tuple[Entry | None, dict | None]:
    """Turn one found file into an Entry, or a skip record when its extension is not an image's."""
    path, offset, mtime_ns, class_name, source = e_args
    entry = Entry(path, offset, size, mtime_ns, class_name, name, source)
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return None, _skip_record(entry, "not an image file extension")
    return entry, None


def scan_container(job: tuple[str, str, str, str]) -> tuple[list[Entry], list[dict]]:
    """List one class: (layout, path of <class>.tar or <class>/, class name, source label)."""
    layout, path, class_name, source = job
    entries, skipped = [], []
    if layout == "tars":
        mtime_ns = os.stat(path).st_mtime_ns
        with tarfile.open(path, "r:") as tf:  # uncompressed only: images are read by byte offset
            for m in tf:
                if m.isdir() or _hidden(m.name):
                    continue
                if not m.isfile():
                    skipped.append(_skip_record(None, "not a regular file", file=m.name, source=source,
                                                class_name=class_name))
                    continue
                entry, skip = _candidate(m.name, m.size, (path, m.offset_data, mtime_ns, class_name, source))
                if entry is not None:
                    entries.append(entry)
                else:
                    skipped.append(skip)
        entries.sort(key=lambda e: e.file)
    else:
        root = Path(path)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(f for f in filenames if not f.startswith(".")):
                full = Path(dirpath) / fname
                st = full.stat()
                rel = full.relative_to(root).as_posix()
                entry, skip = _candidate(rel, st.st_size, (str(full), 0, st.st_mtime_ns, class_name, source))
                if entry is not None:
                    entries.append(entry)
                else:
                    skipped.append(skip)
        entries.sort(key=lambda e: e.file)
    return entries, skipped


def _class_jobs(src: Path, layout: str) -> tuple[list[tuple[str, str, str, str]], list[dict]]:
    jobs, stray = [], []
    for child in sorted(src.iterdir()):
        if child.name.startswith("."):
            continue
        if layout == "tars" and child.is_file() and child.suffix == ".tar":
            jobs.append((layout, str(child), child.stem, f"{src.name}/{child.name}"))
        elif layout == "imagefolder" and child.is_dir():
            jobs.append((layout, str(child), child.name, f"{src.name}/{child.name}"))
        else:
            reason = "not a per-class .tar" if layout == "tars" else "not inside a class folder"
            stray.append(_skip_record(None, reason, file=child.name, source=src.name))
    return jobs, stray


# ----------------------------------------------------------------------------- planning


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


def _check_plan(out: Path, plan: dict, prefix: str) -> bool:
    """True when resuming an earlier run of the same plan; raise when `out` holds something else."""
    path = out / PLAN_NAME
    if not path.exists():
        if any(out.glob(f"{prefix}-*.tar")):
            raise ShardsError(f"{out} already holds {prefix}-*.tar shards but no {PLAN_NAME}; use an empty --out")
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ShardsError(f"cannot read {path} ({err}); delete it or use another --out") from err
    if old == plan:
        return True
    before = old.get("settings", {})
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in plan["settings"].items() if before.get(k) != v]
    if not changed:
        changed = ["the source files changed since that run"]
    raise ShardsError(
        f"{out} holds a conversion with other settings ({'; '.join(changed)}); refusing to resume -- "
        f"rerun with the same settings, or use another --out (or delete {out})"
    )


# ----------------------------------------------------------------------------- writing


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any PIL mode: alpha composited onto white, 16-bit greyscale scaled (not clipped)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if im.mode.startswith("I") else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _encode_jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    to_rgb(im).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class UndecodableImage(Exception):
    pass


def prepare_image(data: bytes, reencode: bool) -> tuple[bytes, str | None]:
    """Decode fully (the check), then return (bytes for `jpg`, transcoding note or None)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format or "unknown"
            if reencode:
                return _encode_jpeg(im), None
            if fmt in JPEG_FORMATS:
                return data, None
            return _encode_jpeg(im), f"{fmt} image transcoded to RGB JPEG"
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise UndecodableImage(f"cannot decode: {type(err).__name__}: {err}") from err


def _read_bytes(e: Entry) -> bytes:
    with open(e.path, "rb") as f:
        f.seek(e.offset)
        data = f.read(e.size)
    if len(data) != e.size:
        raise OSError(f"{e.path}: expected {e.size} bytes at offset {e.offset}, got {len(data)} (source changed?)")
    return data


class _HashingWriter:
    """File wrapper: the shard's sha256 and size come for free while tarfile streams into it."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.raw.write(data)


def write_shard(task: ShardTask) -> dict:
    """Write one whole shard (tmp file + rename) and its record in parts/; returns the record."""
    out = Path(task.out_dir)
    final = out / task.name
    tmp = final.with_name(final.name + ".tmp")
    skipped, transcoded, count = [], [], 0
    with _strict_decoding(), open(tmp, "wb") as raw:
        sink = _HashingWriter(raw)
        with TarWriter(sink, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False) as tw:
            for e, key, class_id in task.samples:
                try:
                    payload, note = prepare_image(_read_bytes(e), task.reencode)
                except UndecodableImage as err:
                    skipped.append(_skip_record(e, str(err)))
                    continue
                if note:
                    transcoded.append(_skip_record(e, note))
                sample = {"__key__": key, "cls": str(class_id).encode("ascii"), "jpg": payload,
                          "json": sample_json(e, class_id)}
                tw.write(sample)
                count += 1
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    record = {"name": task.name, "digest": task.digest, "num_samples": count, "bytes": sink.bytes,
              "sha256": sink.sha.hexdigest(), "skipped": skipped, "transcoded": transcoded}
    _write_json_atomic(out / PARTS_DIR / f"{task.name}.json", record)
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
    except (OSError, ValueError, tarfile.TarError):
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


def _normalize_sources(src: Sequence[Path | str] | Path | str) -> list[Path]:
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not items:
        raise ShardsError(f"no source given; expected {LAYOUTS}")
    paths = sorted(Path(s).expanduser().resolve() for s in items)  # --src order must not matter
    dupes = sorted({str(p) for p in paths if paths.count(p) > 1})
    if dupes:
        raise ShardsError(f"source given twice: {', '.join(dupes)}")
    return paths


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
        src_jobs, stray = _class_jobs(src, layout)
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


def _write_pending(out: Path, tasks: Sequence[ShardTask], resuming: bool, pool: Any, progress: bool) -> list[dict]:
    """Write the shards not already done; return every shard's record, in shard order."""
    records = {t.name: _load_done_record(out, t.name, t.digest) for t in tasks} if resuming else {}
    todo = [t for t in tasks if records.get(t.name) is None]
    if todo:
        (out / INDEX_NAME).unlink(missing_ok=True)  # the index exists only for a complete set
    if resuming:
        print(f"pijepa shards: resuming in {out}: {len(tasks) - len(todo)} of {len(tasks)} shards already written")
    planned = {t.name: len(t.samples) for t in todo}
    with tqdm(total=sum(planned.values()), desc="writing shards", unit="img", disable=not progress) as bar:
        for record in _imap(pool, write_shard, todo, ordered=False):
            records[record["name"]] = record
            bar.update(planned[record["name"]])
    return [records[t.name] for t in tasks]


def write_shards(
    src: list[Path] | Path,
    out: Path,
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
    sources = _normalize_sources(src)
    _validate(samples_per_shard, max_shard_bytes, workers, prefix, seed)
    layouts = [detect_layout(s) for s in sources]  # fail before touching `out`
    out = Path(out).expanduser().resolve()
    if out in sources or any(s in out.parents for s in sources):
        raise ShardsError(f"--out {out} must not be inside a source folder")
    settings = {"sources": [str(s) for s in sources], "samples_per_shard": samples_per_shard,
                "max_shard_bytes": max_shard_bytes, "seed": seed, "reencode": reencode, "prefix": prefix}

    pool = _pool(workers)  # created before any tqdm thread exists (fork safety)
    try:
        entries, classes, scan_skipped = _scan(sources, layouts, pool, progress)
        tasks = plan_tasks(entries, classes, out, seed=seed, samples_per_shard=samples_per_shard,
                           max_shard_bytes=max_shard_bytes, reencode=reencode, prefix=prefix)
        plan = {"format": PLAN_FORMAT, "settings": settings,
                "listing_sha256": listing_fingerprint(entries, classes, scan_skipped),
                "num_samples_planned": len(entries),
                "shards": [{"name": t.name, "num_samples": len(t.samples), "digest": t.digest} for t in tasks]}
        del entries  # the tasks hold what is needed; ImageNet-22K listings are large
        out.mkdir(parents=True, exist_ok=True)
        resuming = _check_plan(out, plan, prefix)
        (out / PARTS_DIR).mkdir(exist_ok=True)
        _write_json_atomic(out / PLAN_NAME, plan)
        records = _write_pending(out, tasks, resuming, pool, progress)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    skipped = scan_skipped + [s for r in records for s in r["skipped"]]
    transcoded = [s for r in records for s in r["transcoded"]]
    index = {
        "format": INDEX_FORMAT,
        "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in records],
        "classes": classes,
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "num_samples": sum(r["num_samples"] for r in records),
        "num_classes": len(classes),
        "seed": seed,
        **{k: settings[k] for k in ("prefix", "samples_per_shard", "max_shard_bytes", "reencode")},
        "sources": [{"path": str(s), "layout": layout} for s, layout in zip(sources, layouts)],
        "skipped": len(skipped),
        "transcoded": len(transcoded),
    }
    _write_json_atomic(out / SKIPPED_NAME, skipped)
    _write_json_atomic(out / TRANSCODED_NAME, transcoded)
    _write_json_atomic(out / INDEX_NAME, index)  # last: its presence marks a complete conversion
    print(f"pijepa shards: wrote {index['num_samples']} images of {len(classes)} classes in {len(records)} shards "
          f"({sum(r['bytes'] for r in records) / 1e9:.2f} GB) to {out}; skipped {len(skipped)} "
          f"(listed in {out / SKIPPED_NAME}); transcoded {len(transcoded)} non-JPEG")
    return index


# ----------------------------------------------------------------------------- reading


def read_index(path: Path | str) -> dict:
    """Load `shards.json` from an output folder (or the file itself), with errors naming the path."""
    path = Path(path)
    file = path / INDEX_NAME if path.is_dir() else path
    if not file.is_file():
        unfinished = (file.parent / PLAN_NAME).exists()
        hint = " (an unfinished conversion has plan.json but no index: rerun it)" if unfinished else ""
        raise FileNotFoundError(f"no shards index at {file}: expected the {INDEX_NAME} written by "
                                f"`pijepa shards write`{hint}")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardsError(f"{file} is not a valid JSON shards index: {err}") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ShardsError(f"{file} is not a pijepa shards index (format {found!r}, expected {INDEX_FORMAT!r})")
    missing = [k for k in ("shards", "classes", "class_to_idx", "num_samples", "num_classes") if k not in index]
    if missing:
        raise ShardsError(f"{file} lacks {', '.join(missing)}; rewrite it with `pijepa shards write`")
    return index


def shard_paths(path: Path | str) -> list[Path]:
    """Absolute shard paths listed by the index in `path` (folder or shards.json), in index order."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    return [root / s["name"] for s in read_index(path)["shards"]]


# ----------------------------------------------------------------------------- CLI
