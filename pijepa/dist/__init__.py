"""Distributed strategies behind one interface (see base.Strategy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pijepa.dist.base import JEPAModels, Strategy

if TYPE_CHECKING:
    from pijepa.config import Config


def build_strategy(name: str, cfg: Config | None = None) -> Strategy:
    """The strategy `name` (dist.strategy); `cfg` carries its settings (dist.*, meta.use_bfloat16)."""
    if name == "single":
        from pijepa.dist.single import SingleStrategy
        return SingleStrategy()
    if name == "ddp":
        from pijepa.dist.single import DDPStrategy
        return DDPStrategy()
    if name == "fsdp":
        from pijepa.dist.fsdp import FSDPStrategy
        return FSDPStrategy(cfg)
    if name == "deepspeed":
        from pijepa.dist.deepspeed import DeepSpeedStrategy
        return DeepSpeedStrategy(cfg)
    raise ValueError(f"dist.strategy {name!r} is not available in this build")


__all__ = ["JEPAModels", "Strategy", "build_strategy"]
