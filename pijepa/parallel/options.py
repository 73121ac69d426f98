"""What a strategy is told: the `dist` config section (owned here, composed into pijepa.config)
and the few facts of the run it needs besides (RunShape). The choices are Literal types, the one
source of each list of names; bounds are declared with their fields (pijepa.runtime.schema)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args

from pijepa.runtime.errors import ConfigError
from pijepa.runtime.schema import bounded

StrategyName = Literal["single", "ddp", "fsdp", "deepspeed"]
FsdpSharding = Literal["full", "grad_op", "hybrid"]
ACMode = Literal["none", "full", "selective"]

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
FSDP_SHARDINGS: tuple[str, ...] = get_args(FsdpSharding)
AC_MODES: tuple[str, ...] = get_args(ACMode)


@dataclass
class DistConfig:
    strategy: StrategyName = "single"  # single (one process) | ddp | fsdp (FSDP2) | deepspeed
    # FSDP2 (fully_shard): full = reshard after forward (ZeRO-3 like); grad_op = keep parameters
    # unsharded between forward and backward (ZeRO-2 like); hybrid = shard within a node,
    # replicate across nodes over a 2-D mesh of hybrid_shard_size ranks per shard group.
    fsdp_sharding: FsdpSharding = "full"
    # ranks per shard group for hybrid; 0 = ranks per node, from the launcher (LOCAL_WORLD_SIZE of
    # torchrun, LOCAL_SIZE of DeepSpeed's launcher, SLURM_NTASKS_PER_NODE); refused when none is set
    hybrid_shard_size: int = bounded(0, min=0, expected="0 (ranks per node) or a positive divisor of the world size")
    activation_checkpointing: ACMode = "none"  # none | full (every block) | selective (every ac_every-th)
    ac_every: int = bounded(2, min=1)  # selective: checkpoint every ac_every-th block
    compile: bool = False  # torch.compile each transformer block
    async_checkpoint: bool = False  # FSDP: torch.distributed.checkpoint.async_save
    deepspeed_config: str = "ds_configs/zero2_bf16.json"  # path or packaged name; batch keys come from data.*
    # overrides the JSON's zero_optimization.stage when >= 0
    zero_stage: int = bounded(-1, min=-1, max=3, expected="-1 (use the JSON's stage), 0, 1, 2 or 3")
    # seconds a collective may wait for the other ranks before it fails (torch's NCCL default)
    timeout_s: int = bounded(600, min=1)
    # seconds a phase of the loop (data, step, check, save) may take on a rank before that rank
    # writes its Python stacks to RUN/hang/ and exits (runtime/watchdog.py); 0 disables. Long enough
    # for the first step's compilation and a ViT-g checkpoint on a slow shared file system.
    step_timeout_s: int = bounded(1800, min=0)

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)


@dataclass(frozen=True)
class RunShape:
    """The run's facts outside `dist` that an engine needs (DeepSpeed derives its batch keys,
    clipping and precision from them)."""

    bf16: bool = False
    micro_batch: int = 32  # data.batch_size
    global_batch: int = 0  # data.global_batch_size; 0 = micro_batch x ranks (no accumulation)
    clip_grad: float = 0.0


def accumulation_steps(micro_batch: int, global_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that micro_batch x accum x world = global_batch."""
    per_step = micro_batch * world_size
    if not global_batch:
        return 1
    if global_batch % per_step:
        raise ConfigError(f"data.global_batch_size {global_batch} is not a multiple of data.batch_size "
                          f"{micro_batch} x {world_size} ranks = {per_step}")
    return global_batch // per_step
