"""pijepa: Probabilistic I-JEPA pretraining at scale."""

from pijepa.config import Config, ConfigError, load_config

__version__ = "0.1.0"


def load_encoder(path, which: str = "target", **kwargs):
    """A ready encoder in eval mode from an official I-JEPA `.pth.tar`, one of our checkpoints or an
    exported encoder file; the architecture is inferred from the weights."""
    from pijepa.models.loading import load_encoder as _load

    return _load(path, which=which, **kwargs)


__all__ = ["Config", "ConfigError", "load_config", "load_encoder", "__version__"]
