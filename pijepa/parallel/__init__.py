"""Distributed strategies behind one interface (see base.Strategy): the only code that knows the
engine. One module per strategy (single, ddp, fsdp, deepspeed; DeepSpeed's JSON and checkpoint
layout in deepspeed_config.py and deepspeed_checkpoint.py), parallelize.py (AC -> compile ->
shard), formats.py (a run's checkpoint folders, and reading any strategy's checkpoint in one
process, for export), options.py (the `dist` config section)."""

from __future__ import annotations

from pijepa.parallel.base import JEPAModels, Strategy
from pijepa.parallel.options import DistConfig, RunShape


def build_strategy(dist_cfg: DistConfig, shape: RunShape) -> Strategy:
    """The strategy `dist_cfg.strategy`, set up from the `dist` section and the run's shape."""
    name = dist_cfg.strategy
    if name == "single":
        from pijepa.parallel.single import SingleStrategy
        return SingleStrategy(dist_cfg)
    if name == "ddp":
        from pijepa.parallel.ddp import DDPStrategy
        return DDPStrategy(dist_cfg)
    if name == "fsdp":
        from pijepa.parallel.fsdp import FSDPStrategy
        return FSDPStrategy(dist_cfg, shape)
    if name == "deepspeed":
        from pijepa.parallel.deepspeed import DeepSpeedStrategy
        return DeepSpeedStrategy(dist_cfg, shape)
    raise ValueError(f"dist.strategy {name!r} has no strategy module")  # a bug: config validates names


__all__ = ["DistConfig", "JEPAModels", "RunShape", "Strategy", "build_strategy"]
