"""The trace beside the plan: memory by category and by phase, collectives per optimizer step, each
with the planner's prediction for the same run (strategy, AC, micro-batch, accumulation, masks) and
the ratio traced / planned.

The planner is asked for the trace's device: on the CPU it plans the CPU kernels (the trace runs
them) and adds no margin. Whether the run fits is judged as `pijepa plan` judges it: the traced
peak plus the GPU's margin (CUDA context and communicators, the caching allocator's slack) against
the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from pijepa.config import Config
from pijepa.plan.costs import Communication, configured_strategy, cost_model
from pijepa.plan.hardware import ALLOCATOR_SLACK, CUDA_OVERHEAD, GPUSpec
from pijepa.plan.memory import MemoryEstimate
from pijepa.plan.planner import PlanContext, build_context
from pijepa.rehearsal.trace import Trace, trace_run

# Traced categories (pijepa.runtime.torch_private) -> the planner's component they are compared with.
# The planner's "transient" is what the tracker splits into gathered weights, communication buffers
# and temporaries.
TRANSIENT_PARTS = ("gathered", "comm_buffers", "temporaries")
# Traced phases -> the planner's phases (pijepa.plan.memory); the others it does not price apart.
PLANNED_PHASE = {name: name for name in ("target forward", "encoder forward", "predictor forward", "loss",
                                          "loss backward", "predictor backward", "encoder backward",
                                          "optimizer step")}


@dataclass
class Row:
    name: str
    traced: float
    planned: float | None

    @property
    def ratio(self) -> float | None:
        return self.traced / self.planned if self.planned else None


@dataclass
class Comparison:
    trace: Trace
    context: PlanContext
    strategy: str  # the cost model's name
    shards: int
    planned: MemoryEstimate
    communication: Communication

    @property
    def label(self) -> str:
        return cost_model(self.strategy).label

    @property
    def traced_peak(self) -> float:
        return float(self.trace.peak["total"])

    @property
    def margin(self) -> float:
        return CUDA_OVERHEAD + ALLOCATOR_SLACK * self.traced_peak

    @property
    def fits(self) -> bool:
        return self.traced_peak + self.margin <= self.context.gpu.memory

    def memory(self) -> list[Row]:
        """Per category at each side's peak, then the total."""
        t, p = self.trace.peak, self.planned
        return [Row("parameters", t["params"] - self.trace.ema_bytes, p.params),
                Row("EMA target", self.trace.ema_bytes, p.ema),
                Row("gradients", t["grads"], p.grads),
                Row("optimizer", t["optimizer"], p.optimizer),
                Row("activations", t["activations"], p.activations),
                Row("temporaries", sum(t[k] for k in TRANSIENT_PARTS), p.transient),
                Row("peak", self.traced_peak, p.tensors)]

    def phases(self) -> list[Row]:
        planned = self.planned.phases
        return [Row(name, float(peak["total"]), planned.get(PLANNED_PHASE.get(name, ""), None))
                for name, peak in self.trace.phase_peaks.items()]

    def collectives(self) -> list[tuple[str, int, Row]]:
        c = self.communication
        planned = {"all_gather": c.all_gather, "reduce_scatter": c.reduce_scatter, "all_reduce": c.all_reduce}
        return [(kind, tally.count, Row(kind, tally.moved, planned.get(kind)))
                for kind, tally in self.trace.collectives.items() if tally.count or planned.get(kind)]


def plan_for(trace: Trace, gpu: GPUSpec) -> tuple[PlanContext, str, int, MemoryEstimate, Communication]:
    """The planner's answer for the run the trace ran."""
    cfg, gpus = trace.cfg, trace.gpus
    ctx = build_context(cfg, gpu, gpus, utilization=1.0, global_batch=None)
    strategy, shards = configured_strategy(cfg.dist, gpus)
    mem = ctx.memory(strategy, cfg.dist.activation_checkpointing, cfg.data.micro_batch, shards, trace.device)
    comm = cost_model(strategy).communication(ctx.shape, gpus, shards, trace.accumulation, ctx.bf16)
    return ctx, strategy, shards, mem, comm


def rehearse(cfg: Config, gpu: GPUSpec, gpus: int, steps: int = 2, source: str = "config") -> Comparison:
    """Traces `cfg` on `gpus` GPUs of kind `gpu` and sets the planner beside it."""
    trace = trace_run(cfg, gpu, gpus, steps, source)
    ctx, strategy, shards, mem, comm = plan_for(trace, gpu)
    return Comparison(trace, ctx, strategy, shards, mem, comm)
