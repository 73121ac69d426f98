"""The files of a shards folder and their names, and reading its index (``shards.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pijepa.runtime.atomic import atomic_write_text
from pijepa.runtime.errors import DataError, DataNotFoundError

INDEX_FORMAT = "pijepa-shards-v1"
PLAN_FORMAT = "pijepa-shards-plan-v1"
INDEX_NAME, PLAN_NAME, PARTS_DIR = "shards.json", "plan.json", "parts"
SKIPPED_NAME, TRANSCODED_NAME = "skipped.json", "transcoded.json"


class ShardsError(DataError):
    """A user-facing problem (bad source, conflicting output folder...): the message says what to do."""


def write_json(path: Path, obj: Any) -> None:
    """Atomically; non-ASCII class and file names stay readable (UTF-8, not \\u escapes)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_index(path: Path | str) -> dict:
    """Load `shards.json` from an output folder (or the file itself), with errors naming the path."""
    path = Path(path)
    file = path / INDEX_NAME if path.is_dir() else path
    if not file.is_file():
        unfinished = (file.parent / PLAN_NAME).exists()
        hint = " (an unfinished conversion has plan.json but no index: rerun it)" if unfinished else ""
        raise DataNotFoundError(f"no shards index at {file}: expected the {INDEX_NAME} written by "
                          f"`pijepa shards write`{hint}")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:  # e.g. no read permission
        raise ShardsError(f"cannot read the shards index {file}: {err.strerror or err}") from err
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
