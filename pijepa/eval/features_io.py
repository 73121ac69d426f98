"""Reading and writing frozen-feature files (format ``pijepa-features-v1``).

A feature file is a plain ``torch.save`` of a dict::

    {"format": "pijepa-features-v1",
     "features": FloatTensor [N, F] (float32, CPU),
     "labels":   LongTensor  [N]    (class indices into ``classes``),
     "classes":  list[str]          (class names, index = label),
     "meta":     dict               (free-form provenance: checkpoint, split, layer, ...)}

Only tensors and plain Python containers/scalars are stored so the file loads with
``torch.load(weights_only=True)``: loading evaluation inputs must never execute pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pijepa.models.loading import describe_load_error
from pijepa.runtime.atomic import atomic_torch_save
from pijepa.runtime.errors import DataError, DataNotFoundError

FORMAT = "pijepa-features-v1"
_KEYS = ("format", "features", "labels", "classes", "meta")


def _check_meta(value: Any, where: str = "meta") -> None:
    """Reject anything ``torch.load(weights_only=True)`` would refuse, at save time.

    Failing when writing (with the offending key) beats a file that cannot be read back later.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be str, got {type(k).__name__} ({k!r})")
            _check_meta(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"{where}: type {type(value).__name__} cannot be stored in a feature file "
        "(allowed: None, bool, int, float, str, tensors, and lists/tuples/dicts of these)"
    )


def _owned_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CPU tensor of ``dtype`` that owns exactly its own storage.

    ``torch.save`` writes a view's whole underlying storage, so a slice of a big buffer would
    silently bloat the file; copy only in that case to avoid doubling memory for large N.
    """
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


def validate_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    where: str = "features",
    error: type[ValueError] = ValueError,
) -> None:
    """Raise ``error`` unless features/labels/classes describe one consistent labelled set.

    ValueError when saving (our own tensors: a bug), DataError when loading (the user's file).
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise error(f"{where}: features must be a 2-D tensor [N, F], got {_describe(features)}")
    if not features.is_floating_point():
        raise error(f"{where}: features must be floating point, got {features.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        raise error(f"{where}: labels must be a 1-D tensor [N], got {_describe(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise error(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise error(
            f"{where}: {features.shape[0]} feature rows but {labels.shape[0]} labels"
        )
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise error(f"{where}: classes must be a list of str")
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= len(classes):
            raise error(
                f"{where}: labels span [{lo}, {hi}] but there are {len(classes)} classes"
            )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def save_features(
    path: str | os.PathLike,
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a feature file atomically: a crash mid-write never leaves a truncated file at ``path``.

    Features are stored as float32 and labels as int64 on CPU whatever they came in as.
    """
    path = Path(path)
    validate_features(features, labels, classes, where=str(path))
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: meta must be a dict, got {type(meta).__name__}")
    _check_meta(meta)
    obj = {
        "format": FORMAT,
        "features": _owned_cpu(features, torch.float32),
        "labels": _owned_cpu(labels, torch.long),
        "classes": [str(c) for c in classes],
        "meta": meta,
    }
    # Atomic (a temporary file beside it, fsynced, renamed over it): an evaluation that reads the
    # file sees the old one or the new one, never a half-written one.
    atomic_torch_save(path, obj)


def load_features(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a feature file; DataError naming ``path`` when it is missing or not a valid one."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"feature file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any unpickling failure means "not a file in our format"
        raise DataError(f"{path}: not a readable {FORMAT} feature file ({describe_load_error(e)})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in a {FORMAT} file, got {type(obj).__name__}")
    fmt = obj.get("format")
    if fmt != FORMAT:
        raise DataError(f"{path}: format is {fmt!r}, expected {FORMAT!r}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    validate_features(obj["features"], obj["labels"], obj["classes"], where=str(path), error=DataError)
    if not isinstance(obj["meta"], dict):
        raise DataError(f"{path}: meta must be a dict, got {type(obj['meta']).__name__}")
    obj["classes"] = list(obj["classes"])
    return obj


def load_train_test(train_path: str | os.PathLike, test_path: str | os.PathLike) -> tuple[dict, dict]:
    """Both feature files of an evaluation, checked to describe the same classes and feature width."""
    train, test = load_features(train_path), load_features(test_path)
    if train["classes"] != test["classes"]:
        raise DataError(
            f"{train_path} and {test_path} have different class lists; label indices would not "
            "mean the same classes"
        )
    for path, split in ((train_path, train), (test_path, test)):
        if split["features"].shape[0] == 0:
            raise DataError(f"{path}: holds no samples; an evaluation needs at least one in each split")
    train_dim, test_dim = train["features"].shape[1], test["features"].shape[1]
    if train_dim != test_dim:
        raise DataError(
            f"{train_path} has {train_dim}-dim features but {test_path} has {test_dim}-dim ones; "
            "extract both with the same encoder and pooling"
        )
    return train, test
