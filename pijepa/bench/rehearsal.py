"""The planner held to the trace for the packaged recipes: `pijepa bench rehearsal`.

Cases (each one `pijepa plan --trace` run, rank 0 of N on fake tensors):
- every recipe at 16 ranks under FSDP full, grad_op and hybrid (8 ranks per shard group), each
  without activation checkpointing, with `full` and with `selective`;
- every recipe as written at 32 and 64 ranks; the effective batch stays 2048, so the micro-batch
  becomes the per-GPU share where that is smaller (64, 32);
- ViT-H/14 at 16 ranks with accumulation 2 and 4 (micro-batches 64 and 32).
Each row: traced and planned peak per rank, their ratio, the peak phase of each, and FSDP's
all-gather / reduce-scatter (and HSDP's all-reduce) bytes per rank per optimizer step, traced and
planned. docs/scale_rehearsal.md holds the table this writes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from pijepa.config import Config, load_config
from pijepa.plan.hardware import GPUS, GiB
from pijepa.rehearsal import rehearse

RECIPES = ("in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vith14_ep66", "in22k_vitg16_ep44")
SHARDINGS = ("full", "grad_op", "hybrid")
AC_MODES = ("none", "full", "selective")


@dataclasses.dataclass(frozen=True)
class Case:
    recipe: str
    gpus: int
    sets: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.recipe, f"{self.gpus} ranks", *self.sets])


def cases(recipes: tuple[str, ...] = RECIPES, matrix: bool = True) -> Iterator[Case]:
    for recipe in recipes:
        if matrix:
            for sharding in SHARDINGS:
                for ac in AC_MODES:
                    yield Case(recipe, 16, (f"dist.fsdp_sharding={sharding}", f"dist.activation_checkpointing={ac}"))
        else:
            yield Case(recipe, 16)
        for gpus in (32, 64):
            yield Case(recipe, gpus)
    if matrix and "in22k_vith14_ep66" in recipes:
        for micro in (64, 32):
            yield Case("in22k_vith14_ep66", 16, (f"data.batch_size={micro}",))


def case_config(case: Case) -> Config:
    """The recipe with the case's settings; at more ranks the micro-batch is at most the per-GPU
    share of the effective batch."""
    cfg = load_config(case.recipe, list(case.sets))
    share = cfg.data.global_batch_size // case.gpus
    if isinstance(cfg.data.batch_size, int) and cfg.data.batch_size > share:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=share))
    return cfg


def run_case(case: Case, gpu: str = "a100-80gb") -> dict[str, Any]:
    start = time.perf_counter()
    c = rehearse(case_config(case), GPUS[gpu], case.gpus, source=case.recipe)
    peaks = c.trace.phase_peaks
    row: dict[str, Any] = {
        "case": case.label, "recipe": case.recipe, "gpus": case.gpus, "sets": list(case.sets),
        "strategy": c.strategy, "ac": c.trace.cfg.dist.activation_checkpointing,
        "micro_batch": c.trace.cfg.data.micro_batch, "accumulation": c.trace.accumulation,
        "traced_gib": c.traced_peak / GiB, "planned_gib": c.planned.tensors / GiB,
        "ratio": c.traced_peak / c.planned.tensors,
        "traced_phase": max(peaks, key=lambda k: peaks[k]["total"]), "planned_phase": c.planned.peak_phase,
        "fits": c.fits, "seconds": time.perf_counter() - start,
    }
    for kind, _count, r in c.collectives():
        row[f"{kind}_gb"] = [r.traced / 1e9, None if r.planned is None else r.planned / 1e9]
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| recipe | ranks | FSDP, AC | mb x acc | traced GiB | planned GiB | ratio | peak phase | all-gather GB "
            "| reduce-scatter GB | all-reduce GB |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        comm = [_pair(r.get(f"{k}_gb")) for k in ("all_gather", "reduce_scatter", "all_reduce")]
        phase = (r["traced_phase"] if r["traced_phase"] == r["planned_phase"]
                 else f"{r['traced_phase']} (planned: {r['planned_phase']})")
        lines.append(f"| {r['recipe']} | {r['gpus']} | {r['strategy'].removeprefix('fsdp_')}, {r['ac']} | "
                     f"{r['micro_batch']} x {r['accumulation']} | {r['traced_gib']:.2f} | {r['planned_gib']:.2f} | "
                     f"{r['ratio']:.3f} | {phase} | " + " | ".join(comm) + " |")
    return "\n".join(lines)


def _pair(pair: list[float | None] | None) -> str:
    if not pair or pair[0] is None or (pair[0] < 1e-3 and not pair[1]):
        return "-"
    planned = "-" if pair[1] is None else f"{pair[1]:.2f}"
    return f"{pair[0]:.2f} ({planned})"
