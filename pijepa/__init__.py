"""pijepa: Probabilistic I-JEPA pretraining at scale.

The names below are loaded on first use, so that importing a low layer (pijepa.runtime, ...) does
not import the whole package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "pijepa.config",
    "load_config": "pijepa.config",
    "UserError": "pijepa.runtime.errors",
    "ConfigError": "pijepa.runtime.errors",
    "DataError": "pijepa.runtime.errors",
    "CheckpointError": "pijepa.runtime.errors",
    "LaunchError": "pijepa.runtime.errors",
}

if TYPE_CHECKING:
    from pijepa.config import Config, load_config
    from pijepa.runtime.errors import CheckpointError, ConfigError, DataError, LaunchError, UserError


def load_encoder(path, which: str = "target", **kwargs):
    """A ready encoder in eval mode from an official I-JEPA `.pth.tar`, one of our checkpoints or an
    exported encoder file; the architecture is inferred from the weights."""
    from pijepa.models.loading import load_encoder as _load

    return _load(path, which=which, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pijepa' has no attribute {name!r}")


__all__ = ["CheckpointError", "Config", "ConfigError", "DataError", "LaunchError", "UserError", "load_config",
           "load_encoder", "__version__"]
