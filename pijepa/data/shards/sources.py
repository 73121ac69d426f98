"""Finding the source images: the layout of a source folder and one byte-range entry per image.

Names starting with ``.`` (``.DS_Store``, ``.ipynb_checkpoints``, macOS ``._x`` AppleDouble
members) are tool metadata and are ignored everywhere; every other file that does not become a
sample gets a skip record.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from pijepa.data.shards.index import ShardsError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp"})
LAYOUTS = "per-class tars (SRC/<class>.tar holding image files) or an ImageFolder tree (SRC/<class>/<image>)"


class Entry(NamedTuple):
    """One source image, located by byte range so that workers can read it without unpacking tars."""

    path: str  # the tar that holds the image, or the image file itself
    offset: int  # where the bytes start inside `path` (0 for plain files)
    size: int
    mtime_ns: int  # of `path`; part of the listing fingerprint, so a changed source blocks resume
    class_name: str
    file: str  # tar member name, or path below the class folder
    source: str  # "<src folder>/<class>.tar" or "<src folder>/<class>"


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in Path(name).parts if part not in (".", ".."))


def skip_record(e: Entry | None, reason: str, *, file: str = "", source: str = "", class_name: str = "") -> dict:
    if e is not None:
        file, source, class_name = e.file, e.source, e.class_name
    return {"file": file, "source": source, "class_name": class_name, "reason": reason}


def normalize_sources(src: Sequence[Path | str] | Path | str) -> list[Path]:
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not items:
        raise ShardsError(f"no source given; expected {LAYOUTS}")
    paths = sorted(Path(s).expanduser().resolve() for s in items)  # --src order must not matter
    dupes = sorted({str(p) for p in paths if paths.count(p) > 1})
    if dupes:
        raise ShardsError(f"source given twice: {', '.join(dupes)}")
    return paths


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
        return None, skip_record(entry, "not an image file extension")
    return entry, None


def _scan_tar(path: str, class_name: str, source: str) -> tuple[list[Entry], list[dict]]:
    entries, skipped = [], []
    mtime_ns = os.stat(path).st_mtime_ns
    with tarfile.open(path, "r:") as tf:  # uncompressed only: images are read by byte offset
        for m in tf:
            if m.isdir() or _hidden(m.name):
                continue
            if not m.isfile():
                skipped.append(skip_record(None, "not a regular file", file=m.name, source=source,
                                           class_name=class_name))
                continue
            entry, skip = _candidate(m.name, m.size, (path, m.offset_data, mtime_ns, class_name, source))
            if entry is not None:
                entries.append(entry)
            elif skip is not None:
                skipped.append(skip)
    return entries, skipped


def _scan_folder(path: str, class_name: str, source: str) -> tuple[list[Entry], list[dict]]:
    entries, skipped = [], []
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
            elif skip is not None:
                skipped.append(skip)
    return entries, skipped


def scan_container(job: tuple[str, str, str, str]) -> tuple[list[Entry], list[dict]]:
    """List one class: (layout, path of <class>.tar or <class>/, class name, source label)."""
    layout, path, class_name, source = job
    scan = _scan_tar if layout == "tars" else _scan_folder
    entries, skipped = scan(path, class_name, source)
    entries.sort(key=lambda e: e.file)
    return entries, skipped


def class_jobs(src: Path, layout: str) -> tuple[list[tuple[str, str, str, str]], list[dict]]:
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
            stray.append(skip_record(None, reason, file=child.name, source=src.name))
    return jobs, stray
