"""Distributed strategies behind one interface (see base.Strategy)."""

from pijepa.dist.base import JEPAModels, Strategy


def build_strategy(name: str) -> Strategy:
    if name == "single":
        from pijepa.dist.single import SingleStrategy
        return SingleStrategy()
    if name == "ddp":
        from pijepa.dist.single import DDPStrategy
        return DDPStrategy()
    raise ValueError(f"dist.strategy {name!r} is not available in this build")


__all__ = ["JEPAModels", "Strategy", "build_strategy"]
