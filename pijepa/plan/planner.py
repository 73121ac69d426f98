"""`pijepa plan`: memory per GPU, largest micro-batch, accumulation, step time and communication of a
config under every parallel strategy, computed from the config alone (no GPU, no weights).

The parts: hardware.py (the GPUs), shapes.py (model shapes on the meta device, the masks' token
counts), activations.py (what a micro-step keeps), costs/ (one cost model per strategy: state and
communication), memory.py (the peak phase), this module (the rows of the plan, the micro-batch
search) and report.py (the table and the JSON).

Step time = FLOPs (`plan.flops.step_flops` at the mean context and target lengths of the config's
masks, plus the recomputed forward under activation checkpointing) / (utilisation x datasheet dense
bf16 peak). Communication (costs/base.py) is per GPU per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from pijepa.plan.activations import LossSpec, checkpointed_blocks, pkt_groups
from pijepa.plan.costs import PLAN_STRATEGIES, Communication, configured_strategy, cost_model
from pijepa.plan.flops import step_flops, transformer_flops
from pijepa.plan.hardware import GPUS, GPUSpec
from pijepa.plan.memory import MemoryEstimate, estimate_memory
from pijepa.plan.shapes import (
    MASK_SAMPLE_STEPS,
    MaskTokens,
    ModelShape,
    ShapeArgs,
    Tokens,
    meta_models,
    model_shape,
    tower_of,
)
from pijepa.runtime.errors import ConfigError

if TYPE_CHECKING:
    from pijepa.config import Config

PLAN_AC = ("none", "full")


def micro_step_flops(shape_args: ShapeArgs, batch: int, tokens: Tokens, ac: str, ac_every: int,
                     loss: LossSpec) -> float:
    """`plan.flops.step_flops` at these lengths, plus the forward recomputed under checkpointing."""

    encoder, predictor = meta_models(*shape_args)
    ctx, tgt, m = tokens.ctx, tokens.tgt, tokens.num_targets
    _, group = pkt_groups(m * batch * tgt, m, tgt, loss.grouping, loss.chunk_size)
    # The lengths are means over mask draws, fractional: the FLOP formulas are polynomials.
    flops = step_flops(encoder, predictor, batch, ctx, tgt, m, group)
    enc, pred = tower_of(encoder.blocks), tower_of(predictor.predictor_blocks)
    enc_ac, pred_ac = checkpointed_blocks(enc.depth, ac, ac_every), checkpointed_blocks(pred.depth, ac, ac_every)
    flops += transformer_flops(ctx, batch, enc.width, enc_ac, enc.hidden)
    flops += transformer_flops(ctx + tgt, m * batch, pred.width, pred_ac, pred.hidden)
    return flops


# ---------------------------------------------------------------- the plan


@dataclass
class PlanRow:
    strategy: str
    ac: str
    micro_batch: int | None  # the largest fitting divisor of the per-GPU batch; None when none fits
    accumulation: int | None
    max_micro_batch: int  # the largest micro-batch that fits at all (0: not even 1)
    fits: bool
    memory: MemoryEstimate  # at micro_batch (at 1 when nothing fits)
    step_flops: float  # per GPU per optimizer step
    step_time_s: float
    communication: Communication

    @property
    def label(self) -> str:
        return cost_model(self.strategy).label


@dataclass
class PlanContext:
    """Everything fixed for one plan: the model, its masks, the machine."""

    shape: ModelShape
    shape_args: ShapeArgs
    tokens: MaskTokens
    gpu: GPUSpec
    gpus: int
    global_batch: int
    utilization: float
    bf16: bool
    attn: str
    loss: LossSpec
    ac_every: int = 2

    @property
    def per_gpu_batch(self) -> int:
        return self.global_batch // self.gpus

    def memory(self, strategy: str, ac: str, micro_batch: int, shards: int, device: str = "cuda") -> MemoryEstimate:
        """`device` "cpu" plans the CPU kernels (a trace on the CPU runs them), without the GPU's margin."""
        accum = max(1, self.per_gpu_batch // micro_batch)
        return estimate_memory(self.shape, micro_batch, self.tokens.worst(micro_batch), strategy,
                               shards=shards, accum=accum, ac=ac, ac_every=self.ac_every, bf16=self.bf16,
                               attn=self.attn, loss=self.loss, device=device)

    def fits(self, strategy: str, ac: str, micro_batch: int, shards: int) -> bool:
        return self.memory(strategy, ac, micro_batch, shards).total <= self.gpu.memory


class ConfiguredRow(TypedDict):
    """The config as written: its strategy, micro-batch and checkpointing."""

    strategy: str
    shards: int
    ac: str
    micro_batch: int
    auto: bool  # data.batch_size: auto (micro_batch is the planner's pick)
    accumulation: int | None  # None when the micro-batch does not divide the per-GPU batch
    divides: bool
    fits: bool
    memory: MemoryEstimate


class Plan(TypedDict):
    context: PlanContext
    rows: list[PlanRow]
    best: PlanRow | None  # the fastest row that fits
    configured: ConfiguredRow


def _largest(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with pred(x), pred monotone (true then false); lo - 1 when none."""
    if hi < lo or not pred(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_micro_batch(ctx: PlanContext, strategy: str, ac: str, shards: int, limit: int = 8192) -> int:
    """Largest micro-batch that fits. Memory grows with the micro-batch, except that it drops where
    accumulation ends (at the per-GPU batch), so the two sides are searched separately."""
    per_gpu = ctx.per_gpu_batch

    def ok(b: int) -> bool:
        return ctx.fits(strategy, ac, b, shards)

    without_accum = _largest(ok, per_gpu, limit)
    if without_accum >= per_gpu:
        return without_accum
    return _largest(ok, 1, per_gpu - 1)


def plan_row(ctx: PlanContext, strategy: str, ac: str, shards: int | None = None) -> PlanRow:
    model = cost_model(strategy)
    shards = shards or model.default_shards(ctx.gpus)
    per_gpu = ctx.per_gpu_batch
    divisors = [b for b in range(per_gpu, 0, -1) if per_gpu % b == 0]
    chosen = next((b for b in divisors if ctx.fits(strategy, ac, b, shards)), None)
    micro = chosen or 1
    accum = per_gpu // micro
    flops = accum * micro_step_flops(ctx.shape_args, micro, ctx.tokens.mean(micro), ac, ctx.ac_every, ctx.loss)
    return PlanRow(
        strategy=strategy, ac=ac, micro_batch=chosen, accumulation=accum if chosen else None,
        max_micro_batch=max_micro_batch(ctx, strategy, ac, shards), fits=chosen is not None,
        memory=ctx.memory(strategy, ac, micro, shards), step_flops=flops,
        step_time_s=flops / (ctx.utilization * ctx.gpu.bf16_flops),
        communication=model.communication(ctx.shape, ctx.gpus, shards, accum, ctx.bf16))


def build_context(cfg: Config, gpu: str | GPUSpec, gpus: int, utilization: float, global_batch: int | None,
                  steps: int = MASK_SAMPLE_STEPS) -> PlanContext:
    """`gpu`: a name of GPUS, or a spec of the device a run has (pijepa.train.auto_batch)."""
    if isinstance(gpu, str) and gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r}: expected one of {', '.join(GPUS)}")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: expected 1 or more")
    if not 0 < utilization <= 1:
        raise ConfigError(f"--utilization {utilization}: expected a fraction in (0, 1]")
    global_batch = global_batch or cfg.data.global_batch_size or cfg.data.micro_batch * gpus
    if global_batch % gpus:
        raise ConfigError(f"--global-batch {global_batch} is not a multiple of --gpus {gpus}")
    o = cfg.optimization
    args = (cfg.meta.model_name, cfg.mask.patch_size, cfg.data.crop_size, cfg.meta.pred_depth,
            cfg.meta.pred_emb_dim, cfg.meta.encoder_depth)
    return PlanContext(
        shape=model_shape(*args), shape_args=args,
        tokens=MaskTokens.from_config(cfg, global_batch // gpus, steps),
        gpu=GPUS[gpu] if isinstance(gpu, str) else gpu, gpus=gpus,
        global_batch=global_batch, utilization=utilization, bf16=cfg.meta.use_bfloat16,
        attn=cfg.meta.attn_backend, loss=LossSpec(o.loss_function, o.pkt_grouping, o.pkt_chunk_size),
        ac_every=cfg.dist.ac_every)


def make_plan(cfg: Config, gpu: str = "a100-80gb", gpus: int = 16, utilization: float = 0.4,
              global_batch: int | None = None, steps: int = MASK_SAMPLE_STEPS) -> Plan:
    ctx = build_context(cfg, gpu, gpus, utilization, global_batch, steps)
    strategy, shards = configured_strategy(cfg.dist, gpus)  # first: it may refuse the DeepSpeed JSON
    rows = [plan_row(ctx, s, ac) for s in PLAN_STRATEGIES for ac in PLAN_AC]
    fitting = [r for r in rows if r.fits]
    best = min(fitting, key=lambda r: (r.step_time_s, r.communication.total)) if fitting else None
    configured = configured_row(ctx, cfg, strategy, shards)
    return {"context": ctx, "rows": rows, "best": best, "configured": configured}


def configured_row(ctx: PlanContext, cfg: Config, strategy: str, shards: int) -> ConfiguredRow:
    """The config as written: its strategy, micro-batch (`auto`: the one the trainer would pick,
    the largest fitting divisor of the per-GPU batch) and checkpointing."""
    ac, auto = cfg.dist.activation_checkpointing, cfg.data.batch_size == "auto"
    micro = (plan_row(ctx, strategy, ac, shards).micro_batch or 1) if auto else cfg.data.micro_batch
    per_gpu = ctx.per_gpu_batch
    mem = ctx.memory(strategy, ac, micro, shards)
    divides = per_gpu % micro == 0
    return {"strategy": strategy, "shards": shards, "ac": ac, "micro_batch": micro, "auto": auto,
            "accumulation": per_gpu // micro if divides else None, "divides": divides,
            "fits": mem.total <= ctx.gpu.memory, "memory": mem}
