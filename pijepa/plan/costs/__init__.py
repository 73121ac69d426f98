"""One cost model per parallel strategy: model state, engine buffers and communication per GPU.

Model state per strategy (bf16 runs; fp32 runs use 4-byte weights everywhere and have no separate
master copy); each row is derived, with its engine's buffers and traffic, in its family's module:
replicated.py (single, DDP), fsdp.py (FSDP2 full, grad_op, hybrid), zero.py (DeepSpeed ZeRO-1/2/3).
Notation in base.py.

| strategy     | params           | grads                               | optimizer                    | EMA    |
| ------------ | ---------------- | ----------------------------------- | ---------------------------- | ------ |
| single       | 4P fp32          | 4Psi fp32, from backward to step    | 8Psi: AdamW m, v             | 4Pe    |
| DDP          | 4P fp32          | + 4Psi DDP buckets, always there    | 8Psi                         | 4Pe    |
| FSDP full    | 4P/S fp32 shards | 4Psi/S fp32 shards                  | 8Psi/S                       | 4Pe/S  |
| FSDP grad_op | 4P/S             | 4Psi/S                              | 8Psi/S                       | 4Pe/S  |
| ZeRO-1       | 2P bf16 module   | 4Psi fp32 accumulation buffer       | 12Psi/N: fp32 master + m + v | 4Pe    |
| ZeRO-2       | 2P bf16          | 4Psi/N fp32 partition               | 12Psi/N                      | 4Pe    |
| ZeRO-3       | 2P/N bf16        | 4Psi/N fp32 partition               | 12Psi/N                      | 4Pe/N  |

Adding a strategy: a CostModel subclass in its own module (or a new option of an existing
family), with a `configured(dist, gpus)` function when it is a new `dist.strategy`; then one entry
in COST_MODELS below (and in CONFIGURED).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pijepa.parallel.options import DistConfig, StrategyName
from pijepa.plan.costs import fsdp, replicated, zero
from pijepa.plan.costs.base import Communication, CostModel, State
from pijepa.plan.costs.fsdp import FsdpCost
from pijepa.plan.costs.replicated import ReplicatedCost
from pijepa.plan.costs.zero import DSSettings, ZeroCost
from pijepa.plan.precision import Precision
from pijepa.plan.shapes import ModelShape

# In the table's order. `pijepa plan` compares the `compared` ones; `single` (one process, no
# wrapper) is what the memory tests measure; `fsdp_hybrid` appears only for a config asking for it.
COST_MODELS: dict[str, CostModel] = {model.name: model for model in (
    ReplicatedCost(ddp=False, compared=False), ReplicatedCost(ddp=True),
    FsdpCost("full"), FsdpCost("grad_op"), FsdpCost("hybrid", compared=False),
    ZeroCost(1), ZeroCost(2), ZeroCost(3),
)}

# dist.strategy -> (cost model name, shard ranks) of the config as written.
CONFIGURED: dict[StrategyName, Callable[[DistConfig, int], tuple[str, int]]] = {
    "single": replicated.configured, "ddp": replicated.configured,
    "fsdp": fsdp.configured, "deepspeed": zero.configured,
}

STRATEGY_NAMES = {name: model.label for name, model in COST_MODELS.items()}  # display names
PLAN_STRATEGIES = tuple(name for name, model in COST_MODELS.items() if model.compared)


def cost_model(strategy: str) -> CostModel:
    try:
        return COST_MODELS[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(COST_MODELS)}") from None


def configured_strategy(dist: DistConfig, gpus: int) -> tuple[str, int]:
    """(cost model name, shard ranks) of a config's `dist` section."""
    return CONFIGURED[dist.strategy](dist, gpus)


def precision(strategy: str, bf16: bool) -> Precision:
    return cost_model(strategy).precision(bf16)


def state_bytes(shape: ModelShape, strategy: str, shards: int, accum: int, bf16: bool,
                device: str = "cuda", ds: DSSettings | None = None) -> State:
    """`strategy`'s state; `ds` replaces the buffer settings of a ZeRO model (others have none)."""
    model = cost_model(strategy)
    if ds is not None and isinstance(model, ZeroCost):
        model = replace(model, ds=ds)
    return model.state(shape, shards, accum, bf16, device)


def communication_bytes(shape: ModelShape, strategy: str, world: int, accum: int, bf16: bool,
                        shards: int | None = None) -> Communication:
    model = cost_model(strategy)
    return model.communication(shape, world, shards or model.default_shards(world), accum, bf16)


__all__ = [
    "COST_MODELS", "CONFIGURED", "PLAN_STRATEGIES", "STRATEGY_NAMES", "Communication", "CostModel",
    "DSSettings", "FsdpCost", "ReplicatedCost", "State", "ZeroCost", "communication_bytes", "configured_strategy",
    "cost_model", "precision", "state_bytes",
]
