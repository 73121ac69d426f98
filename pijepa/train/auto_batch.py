"""`data.batch_size: auto`: the trainer asks the planner (pijepa.plan) for the largest micro-batch
that fits the device it runs on, once, when training starts.

The micro-batch is the largest divisor of the per-rank batch (data.global_batch_size / ranks) whose
planned peak (`pijepa plan`'s memory model for the configured strategy and activation
checkpointing, at the run's mask lengths) fits the budget: data.memory_budget_gib when set, else the
device's free memory (a GPU's `mem_get_info`; on the CPU the host's available memory shared by the
node's ranks). Accumulation makes up the rest of the global batch. A measured budget is rounded
down to BUDGET_STEP so that ranks whose free memory differs by a few hundred MiB still pick alike;
ranks that do not are refused (`agree_on_batch`) rather than left to run different step shapes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from pijepa.config import Config
from pijepa.parallel.base import Strategy
from pijepa.parallel.fsdp import ranks_per_node
from pijepa.plan.costs import configured_strategy
from pijepa.plan.hardware import GiB, GPUSpec
from pijepa.plan.planner import build_context, plan_row
from pijepa.runtime.errors import ConfigError

BUDGET_STEP = GiB // 2


def host_available_bytes() -> int:
    """Linux MemAvailable (what can be allocated without swapping), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_budget(cfg: Config) -> tuple[int, str]:
    """Bytes this rank may plan for, and where the number comes from."""
    if cfg.data.memory_budget_gib:
        return round(cfg.data.memory_budget_gib * GiB), "data.memory_budget_gib"
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    local = ranks_per_node(os.environ)
    ranks = local[0] if local else 1
    return host_available_bytes() // ranks, f"host memory available to each of {ranks} local rank(s)"


def resolve_batch_size(cfg: Config, world_size: int) -> tuple[Config, str | None]:
    """`cfg` with data.batch_size a number, and the line to log about the choice (None when the
    config gave a number)."""
    if cfg.data.batch_size != "auto":
        return cfg, None
    budget, source = device_budget(cfg)
    if not cfg.data.memory_budget_gib:  # measured: rounded, so that ranks pick alike
        budget = budget // BUDGET_STEP * BUDGET_STEP
    spec = GPUSpec(name=source, memory=budget, bf16_flops=1.0)  # FLOPs unused: memory only
    ctx = build_context(cfg, spec, world_size, utilization=1.0, global_batch=None)
    strategy, shards = configured_strategy(cfg.dist, world_size)
    ac = cfg.dist.activation_checkpointing
    row = plan_row(ctx, strategy, ac, shards)
    if row.micro_batch is None:
        raise ConfigError(
            f"data.batch_size auto: not even micro-batch 1 fits in {budget / GiB:.1f} GiB ({source}); the "
            f"planner needs {row.memory.total / GiB:.1f} GiB for {row.label}, AC {ac}: use more ranks, AC, "
            f"or a smaller model")
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=row.micro_batch))
    note = (f"data.batch_size auto: micro-batch {row.micro_batch} x {row.accumulation} accumulation x "
            f"{world_size} ranks = {ctx.global_batch}; planned peak {row.memory.total / GiB:.1f} GiB of "
            f"{budget / GiB:.1f} GiB ({source}), {row.label}, AC {ac}")
    return resolved, note


def agree_on_batch(strategy: Strategy, cfg: Config) -> None:
    """Every rank must run the same micro-batch: refuses (on every rank) when they picked apart."""
    mine = cfg.data.micro_batch
    first = strategy.broadcast_object(mine)
    if strategy.any_rank(first != mine):
        raise ConfigError(f"data.batch_size auto: the ranks' free memory differs enough to pick different "
                          f"micro-batches (rank 0: {first}); set data.memory_budget_gib or a number")
