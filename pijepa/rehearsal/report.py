"""`pijepa plan --trace` as a table and as JSON."""

from __future__ import annotations

from typing import Any

from pijepa.plan.hardware import GiB
from pijepa.rehearsal.compare import Comparison, Row


def _ratio(row: Row) -> str:
    return f"{row.ratio:.3f}" if row.ratio is not None else "-"


def _gib(x: float | None) -> str:
    return f"{x / GiB:.3f}" if x is not None else "-"


def _header(c: Comparison, config_name: str) -> list[str]:
    t, cfg = c.trace, c.trace.cfg
    return [
        f"trace: {config_name} on {t.gpus} x {c.context.gpu.name}, rank 0 of a fake process group, fake "
        f"tensors on {t.device} ({t.device.upper()} kernels), {t.steps} optimizer steps of the real train step",
        f"{c.label} (sharded over {c.shards}), AC {cfg.dist.activation_checkpointing}, micro-batch "
        f"{cfg.data.micro_batch} x {t.accumulation} accumulation, {'bf16' if c.context.bf16 else 'fp32'}; "
        f"masks at their worst: context {t.ctx_tokens}, {cfg.mask.num_pred_masks} targets x {t.tgt_tokens} tokens",
        "",
    ]


def _memory_lines(c: Comparison) -> list[str]:
    lines = [f"{'memory per rank (GiB)':<24}{'traced':>9}{'planned':>9}{'ratio':>7}"]
    lines += [f"  {r.name:<22}{_gib(r.traced):>9}{_gib(r.planned):>9}{_ratio(r):>7}" for r in c.memory()]
    lines.append(f"  peak phase: traced {max(c.trace.phase_peaks, key=lambda k: c.trace.phase_peaks[k]['total'])}, "
                 f"planned {c.planned.peak_phase}")
    lines += ["", f"{'peak by phase (GiB)':<24}{'traced':>9}{'planned':>9}{'ratio':>7}"]
    lines += [f"  {r.name:<22}{_gib(r.traced):>9}{_gib(r.planned):>9}{_ratio(r):>7}" for r in c.phases()]
    return lines


def _collective_lines(c: Comparison) -> list[str]:
    lines = ["", f"{'collectives per optimizer step':<32}{'count':>6}{'traced GB':>11}{'planned GB':>11}{'ratio':>7}",
             "  (bytes one rank moves, ring algorithms)"]
    for kind, count, r in c.collectives():
        planned = f"{r.planned / 1e9:.3f}" if r.planned is not None else "-"
        lines.append(f"  {kind:<30}{count:>6}{r.traced / 1e9:>11.3f}{planned:>11}{_ratio(r):>7}")
    return lines


def format_comparison(c: Comparison, config_name: str) -> str:
    gpu = c.context.gpu
    verdict = (f"traced peak {c.traced_peak / GiB:.1f} GiB + margin {c.margin / GiB:.1f} GiB = "
               f"{(c.traced_peak + c.margin) / GiB:.1f} GiB of {gpu.memory / GiB:.1f} GiB: "
               f"{'fits' if c.fits else 'does NOT fit'}")
    return "\n".join([*_header(c, config_name), *_memory_lines(c), *_collective_lines(c), "", verdict])


def _row(r: Row) -> dict[str, Any]:
    return {"traced": r.traced, "planned": r.planned, "ratio": r.ratio}


def comparison_to_json(c: Comparison, config_name: str) -> dict[str, Any]:
    t, cfg = c.trace, c.trace.cfg
    return {
        "config": config_name, "gpus": t.gpus, "gpu": c.context.gpu.name, "device": t.device, "steps": t.steps,
        "strategy": c.strategy, "shards": c.shards, "ac": cfg.dist.activation_checkpointing,
        "micro_batch": cfg.data.micro_batch, "accumulation": t.accumulation,
        "tokens": {"context": t.ctx_tokens, "target": t.tgt_tokens, "targets": cfg.mask.num_pred_masks},
        "memory_bytes": {r.name: _row(r) for r in c.memory()},
        "phase_bytes": {r.name: _row(r) for r in c.phases()},
        "peak_phase": {"traced": max(t.phase_peaks, key=lambda k: t.phase_peaks[k]["total"]),
                       "planned": c.planned.peak_phase},
        "collectives": {kind: {"count": count, "moved_bytes": _row(r)} for kind, count, r in c.collectives()},
        "margin_bytes": c.margin, "gpu_memory_bytes": c.context.gpu.memory, "fits": c.fits,
    }


def not_fitting(c: Comparison) -> str:
    """The one line of a run that does not fit its GPU."""
    cfg = c.trace.cfg
    return (f"the traced peak per rank, {c.traced_peak / GiB:.1f} GiB + {c.margin / GiB:.1f} GiB margin, does not "
            f"fit the {c.context.gpu.memory / GiB:.1f} GiB of a {c.context.gpu.name}: {c.label}, AC "
            f"{cfg.dist.activation_checkpointing}, micro-batch {cfg.data.micro_batch} x {c.trace.accumulation} on "
            f"{c.trace.gpus} GPUs; use activation checkpointing, a smaller micro-batch (data.batch_size, or auto) "
            f"or more GPUs")
