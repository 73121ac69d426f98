"""The run's real step at its real world size, in one process, on fake tensors.

`trace_run` builds the run as `pijepa train` would on `gpus` ranks (the strategy from the config,
its mesh, activation checkpointing, accumulation, `data.batch_size: auto` planned for the GPU's
memory), as rank 0 of a fake process group, with every tensor fake (shapes and dtypes, no storage:
a ViT-g's weights cost nothing). It then runs `steps` optimizer steps of the trainer's own
TrainStep (every micro-step, backward, gradient norm, optimizer, EMA) on batches shaped like the
collator's worst-case masks, under FSDP2's memory tracker and a count of the collectives. What
rank 0 holds and sends is what every rank holds and sends: FSDP shards evenly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pijepa.config import Config
from pijepa.plan.costs.fsdp import NODE_GPUS
from pijepa.plan.hardware import GiB, GPUSpec
from pijepa.plan.shapes import MaskTokens, Tokens
from pijepa.runtime.errors import ConfigError
from pijepa.runtime.torch_private import CollectiveCounter, CollectiveTally, fake_tensors, fake_world, memory_tracker
from pijepa.train.auto_batch import resolve_batch_size
from pijepa.train.build import accumulation_steps, build_strategy_for, use_fused_loss
from pijepa.train.step import TrainStep

TRACEABLE = ("fsdp",)
# The schedules' length does not change what a step holds; any number of steps per epoch will do.
NOMINAL_STEPS_PER_EPOCH = 1000


@dataclass
class Trace:
    """What rank 0 held and sent while the steps ran."""

    cfg: Config  # as run: data.batch_size a number
    gpus: int
    accumulation: int
    device: str
    ctx_tokens: int  # context tokens per image of the traced batches
    tgt_tokens: int  # tokens per target block
    steps: int
    phase_peaks: dict[str, dict[str, int]]  # phase -> bytes by category (torch_private) and "total"
    phase_starts: dict[str, dict[str, int]]  # the same when each phase is first entered
    peak: dict[str, int]  # the categories at the largest total
    ema_bytes: int  # the EMA target's shards (inside "params")
    collectives: dict[str, CollectiveTally]  # per optimizer step (the last one)


def traceable(cfg: Config, source: str) -> None:
    if cfg.dist.strategy not in TRACEABLE:
        raise ConfigError(f"{source}: dist.strategy {cfg.dist.strategy} cannot be traced on fake tensors; "
                          f"--trace rehearses {', '.join(TRACEABLE)} (DeepSpeed repoints parameters into flat "
                          f"buffers and reads values back on the host; its collectives are counted on real "
                          f"ranks instead: docs/scale_rehearsal.md)")


def planned_for(cfg: Config, gpu: GPUSpec, gpus: int) -> Config:
    """`cfg` with its `auto` choices made as the trainer would make them on `gpus` GPUs of this
    kind: `data.batch_size` with their whole memory as the budget, `optimization.fused_loss` as
    on CUDA (where the fused path is the faster one), whatever device the trace runs on."""
    if cfg.data.batch_size == "auto" and not cfg.data.memory_budget_gib:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, memory_budget_gib=gpu.memory / GiB))
    fused = use_fused_loss(cfg, torch.device("cuda"))
    cfg = dataclasses.replace(cfg, optimization=dataclasses.replace(cfg.optimization, fused_loss=fused))
    return resolve_batch_size(cfg, gpus)[0]


def local_world_size(cfg: Config, gpus: int) -> int:
    """Ranks per node the launcher would report: what `hybrid` shards over when not told."""
    return cfg.dist.hybrid_shard_size or min(NODE_GPUS, gpus)


def worst_batch(cfg: Config, worst: Tokens) -> tuple[list[tuple[torch.Tensor, ...]], int, int]:
    """One micro-batch as the loader hands it over (uint8 crops, labels, context and target masks
    [M, B, K]) at the longest context and target lengths the config's masks reach. The index
    values do not matter to fake tensors; the shapes are the collator's."""
    b, size, k = cfg.data.micro_batch, cfg.data.crop_size, cfg.mask
    ctx, tgt = int(worst.ctx), int(worst.tgt)
    grid = (size // k.patch_size) ** 2
    images = torch.zeros(b, 3, size, size, dtype=torch.uint8)
    masks_enc = (torch.arange(ctx) % grid).expand(k.num_enc_masks, b, ctx).contiguous()
    masks_pred = (torch.arange(tgt) % grid).expand(k.num_pred_masks, b, tgt).contiguous()
    return [(images, torch.zeros(b, dtype=torch.long), masks_enc, masks_pred)], ctx, tgt


def trace_run(cfg: Config, gpu: GPUSpec, gpus: int, steps: int = 2, source: str = "config") -> Trace:
    """Rehearses `steps` optimizer steps of `cfg` on `gpus` GPUs of kind `gpu` (see the module)."""
    traceable(cfg, source)
    if steps < 2:
        raise ConfigError(f"--trace-steps {steps}: expected 2 or more (the optimizer state exists from step 2)")
    cfg = planned_for(cfg, gpu, gpus)
    per_gpu = (cfg.data.global_batch_size or cfg.data.micro_batch * gpus) // gpus
    worst = MaskTokens.from_config(cfg, per_gpu).worst(cfg.data.micro_batch)  # the planner's draws
    with fake_world(gpus, local_world_size(cfg, gpus)):
        strategy = build_strategy_for(cfg)
        accum = accumulation_steps(cfg, gpus)
        with fake_tensors():
            batch, ctx, tgt = worst_batch(cfg, worst)  # fake too: a large batch costs nothing
            stepper = TrainStep(cfg, strategy, accum, NOMINAL_STEPS_PER_EPOCH)
            models = stepper.models
            ema = sum(_local_bytes(p) for p in models.target_encoder.parameters())
            tracker = memory_tracker({"target": models.target_encoder, "encoder": models.encoder,
                                      "predictor": models.predictor}, strategy.optimizer)
            counter = CollectiveCounter()
            with tracker, counter:
                for step in range(steps):
                    counter.reset()
                    stepper.run(step, batch * accum)
        device = strategy.device.type
    return Trace(cfg=cfg, gpus=gpus, accumulation=accum, device=device, ctx_tokens=ctx, tgt_tokens=tgt,
                 steps=steps, phase_peaks=dict(tracker.phase_peaks),
                 phase_starts=dict(tracker.phase_starts),
                 peak=max(tracker.phase_peaks.values(), key=lambda p: p["total"]), ema_bytes=ema,
                 collectives={k: dataclasses.replace(v) for k, v in counter.tallies.items()})


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.numel() * local.element_size()
