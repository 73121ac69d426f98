"""Configs shipped with the package: the top-level `configs/` and `ds_configs/` folders are the
packages `pijepa.configs` and `pijepa.ds_configs` (setup.py maps them), read with
importlib.resources, so a bare name works from a source checkout and from an installed wheel."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from pijepa.runtime.errors import ConfigError

_KINDS = {"config": ("pijepa.configs", ".yaml"), "deepspeed": ("pijepa.ds_configs", ".json")}


def packaged_names(kind: str = "config") -> list[str]:
    package, suffix = _KINDS[kind]
    files = importlib.resources.files(package)
    return sorted(p.name.removesuffix(suffix) for p in files.iterdir() if p.name.endswith(suffix))


def resolve_packaged(name_or_path: str | Path, kind: str = "config") -> Path:
    """`name_or_path` if it is an existing file; else a packaged file named like it (a bare name
    such as `cpu_default`, with or without its suffix, or `configs/cpu_default.yaml` as written
    from the repo root); else a ConfigError listing the packaged names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    package, suffix = _KINDS[kind]
    name = path.name if path.name.endswith(suffix) else path.name + suffix
    candidate = importlib.resources.files(package) / name
    if candidate.is_file():
        return Path(str(candidate))
    known = ", ".join(packaged_names(kind))
    raise ConfigError(f"{name_or_path}: no such file, and no packaged {kind} file of that name "
                      f"(packaged: {known})")
