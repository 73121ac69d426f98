"""The plan as a table (`pijepa plan`) and as JSON (`pijepa plan --json`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pijepa.plan.costs import COST_MODELS, cost_model
from pijepa.plan.hardware import ALLOCATOR_SLACK, CUDA_OVERHEAD, GiB
from pijepa.plan.memory import MemoryEstimate
from pijepa.plan.planner import Plan, PlanContext, PlanRow

LEGEND = ("mb = largest micro-batch dividing the per-GPU batch that fits (memory columns at it; at 1 "
          "when none fits); max mb = largest that fits at all; step s = FLOPs / (utilisation x peak), "
          "communication not included; AG / RS / AR = all-gather / reduce-scatter / all-reduce GB per "
          "GPU per optimizer step.")


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _header_lines(ctx: PlanContext, config_name: str) -> list[str]:
    s, t = ctx.shape, ctx.tokens
    worst, mean = t.worst(ctx.per_gpu_batch), t.mean(ctx.per_gpu_batch)
    return [
        f"plan: {config_name}: {ctx.shape_args[0]}/{s.patch_size} {s.image_size[0]}px, predictor "
        f"{s.predictor.depth}x{s.predictor.width}; params {s.encoder_params / 1e6:.0f}M encoder + "
        f"{s.predictor_params / 1e6:.1f}M predictor ({s.trainable_params / 1e6:.0f}M trained); "
        f"{'bf16' if ctx.bf16 else 'fp32'}, attention {ctx.attn}, loss {ctx.loss.name}",
        f"{ctx.gpus} x {ctx.gpu.name} ({ctx.gpu.memory / GiB:.1f} GiB, {ctx.gpu.bf16_flops / 1e12:.0f} TFLOP/s "
        f"bf16 dense); effective batch {ctx.global_batch} = {ctx.per_gpu_batch} per GPU = micro-batch x "
        f"accumulation; step time at {ctx.utilization:.0%} of peak",
        f"tokens per image (masks of {ctx.per_gpu_batch} images, {t.ctx.shape[0]} draws): context "
        f"{mean.ctx:.0f} mean / {worst.ctx:.0f} worst, target blocks {mean.num_targets} x {mean.tgt:.0f} "
        f"mean / {worst.tgt:.0f} worst, of {s.num_patches}",
        "memory in GiB per GPU at the micro-batch, components of the peak phase; margin = "
        f"{CUDA_OVERHEAD / GiB:.0f} GiB CUDA/NCCL + {ALLOCATOR_SLACK:.0%} allocator slack",
        "",
    ]


def _row_line(r: PlanRow) -> str:
    m, c = r.memory, r.communication
    mb = f"{r.micro_batch}" if r.fits else "-"
    acc = f"x{r.accumulation}" if r.fits else "-"
    return (f"{r.label:<13}{r.ac:<5}{_gib(m.params):>7}{_gib(m.grads):>7}{_gib(m.optimizer):>7}{_gib(m.ema):>6}"
            f"{_gib(m.activations):>7}{_gib(m.transient):>7}{_gib(m.margin):>7}{_gib(m.total):>7}  "
            f"{'yes' if r.fits else 'NO':<5}{mb:>4}{acc:>6}{r.max_micro_batch:>7}{r.step_time_s:>8.2f}"
            f"{c.all_gather / 1e9:>7.1f}{c.reduce_scatter / 1e9:>7.1f}{c.all_reduce / 1e9:>7.1f}  {m.peak_phase}")


def _summary_lines(plan: Plan) -> list[str]:
    ctx, best, cf = plan["context"], plan["best"], plan["configured"]
    if best is not None:
        first = (f"fastest that fits: {best.label}, AC {best.ac}, micro-batch {best.micro_batch} x "
                 f"{best.accumulation} accumulation x {ctx.gpus} GPUs = {ctx.global_batch}, "
                 f"{best.memory.total / GiB:.1f} GiB, {best.step_time_s:.2f} s/step, "
                 f"{best.step_flops / 1e12:.0f} TFLOP per GPU per step")
    else:
        first = "nothing fits at micro-batch 1: more GPUs, a larger GPU or a smaller model"
    acc = f"x {cf['accumulation']} accumulation" if cf["divides"] else "(does not divide the per-GPU batch)"
    micro = f"auto: {cf['micro_batch']}" if cf["auto"] else cf["micro_batch"]
    configured = (f"as configured: {cost_model(cf['strategy']).label} (sharded over {cf['shards']}), AC "
                  f"{cf['ac']}, micro-batch {micro} {acc}: {cf['memory'].total / GiB:.1f} GiB, "
                  f"{'fits' if cf['fits'] else 'does NOT fit'}")
    return [first, configured]


def format_plan(plan: Plan, config_name: str) -> str:
    lines = _header_lines(plan["context"], config_name)
    header = (f"{'strategy':<13}{'AC':<5}{'params':>7}{'grads':>7}{'optim':>7}{'EMA':>6}{'activ':>7}"
              f"{'trans':>7}{'margin':>7}{'total':>7}  {'fits':<5}{'mb':>4}{'x acc':>6}{'max mb':>7}"
              f"{'step s':>8}{'AG GB':>7}{'RS GB':>7}{'AR GB':>7}  peak phase")
    lines += [header, "-" * len(header)]
    lines += [_row_line(r) for r in plan["rows"]]
    lines.append("")
    # Each strategy family may add a sentence on its assumptions (ZeRO: the DeepSpeed buffer sizes).
    notes = dict.fromkeys(note for r in plan["rows"] if (note := cost_model(r.strategy).note))
    lines.append(" ".join([LEGEND, *notes]))
    return "\n".join(lines + _summary_lines(plan))


def _memory_json(m: MemoryEstimate) -> dict[str, Any]:
    return {**asdict(m), "tensors": m.tensors, "total": m.total}


def _row_json(r: PlanRow) -> dict[str, Any]:
    return {"strategy": r.strategy, "name": r.label, "ac": r.ac, "fits": r.fits, "micro_batch": r.micro_batch,
            "accumulation": r.accumulation, "max_micro_batch": r.max_micro_batch,
            "memory_bytes": _memory_json(r.memory), "step_flops": r.step_flops, "step_time_s": r.step_time_s,
            "communication_bytes": {**asdict(r.communication), "total": r.communication.total}}


def assumptions(bf16: bool) -> dict[str, Any]:
    """The margin and, per strategy family, the settings taken from outside the config."""
    out: dict[str, Any] = {"cuda_overhead_bytes": CUDA_OVERHEAD, "allocator_slack": ALLOCATOR_SLACK}
    for name, model in COST_MODELS.items():
        settings = model.assumptions(bf16)
        if settings is not None:
            out.setdefault(model.family, {})[name] = settings
    return out


def plan_to_json(plan: Plan, config_name: str) -> dict[str, Any]:
    ctx, best, cf = plan["context"], plan["best"], plan["configured"]
    worst, mean = ctx.tokens.worst(ctx.per_gpu_batch), ctx.tokens.mean(ctx.per_gpu_batch)
    return {
        "config": config_name,
        "model": {"name": ctx.shape_args[0], **asdict(ctx.shape)},
        "gpu": {**asdict(ctx.gpu), "count": ctx.gpus},
        "global_batch": ctx.global_batch, "per_gpu_batch": ctx.per_gpu_batch, "utilization": ctx.utilization,
        "bf16": ctx.bf16, "attn_backend": ctx.attn, "loss": asdict(ctx.loss),
        "tokens": {"worst": asdict(worst), "mean": asdict(mean)},
        "assumptions": assumptions(ctx.bf16),
        "rows": [_row_json(r) for r in plan["rows"]],
        "best": _row_json(best) if best is not None else None,
        "configured": {**{k: v for k, v in cf.items() if k != "memory"}, "memory_bytes": _memory_json(cf["memory"])},
    }
