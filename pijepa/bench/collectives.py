"""Collectives per optimizer step of a real run, counted on real ranks, beside the planner's model.

`pijepa bench collectives`, started by torchrun or DeepSpeed's launcher like `pijepa train`, trains
the configured run for a few steps and counts, on every rank, each collective its train steps issue
(kind, count, payload, the bytes one rank moves by ring algorithms: pijepa.runtime.torch_private's
CollectiveCounter, which sees c10d's ops whoever calls them: FSDP2, DeepSpeed's engine, DTensor).
Rank 0 prints the last step's counts (every step after the first moves the same) next to the
planner's communication model for the world size at hand. This is how the ZeRO model is held to
DeepSpeed, which cannot run on fake tensors (`pijepa plan --trace` covers FSDP).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pijepa.config import Config
from pijepa.plan.costs import configured_strategy, cost_model
from pijepa.plan.shapes import model_shape
from pijepa.runtime.errors import CheckpointError
from pijepa.runtime.torch_private import COLLECTIVE_KINDS, CollectiveCounter
from pijepa.train.build import accumulation_steps
from pijepa.train.trainer import Trainer


def quiet_run(cfg: Config, folder: Path, steps: int) -> Config:
    """`cfg` for `steps` counted steps in `folder`: no TensorBoard, no checkpoint but the last."""
    log = dataclasses.replace(cfg.logging, folder=str(folder), tensorboard=False, log_freq=steps,
                              checkpoint_freq=steps, check_freq=steps, keep_checkpoints=1)
    return dataclasses.replace(cfg, logging=log,
                               optimization=dataclasses.replace(cfg.optimization, max_steps=steps))


def scratch_folder() -> Path:
    """The run folder every rank of this launch writes the last step's checkpoint into (sharded
    strategies need one folder): named by the launch's rendezvous, removed by rank 0 at the end."""
    launch = f"{os.environ.get('MASTER_PORT', 'single')}-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    return Path(tempfile.gettempdir()) / f"pijepa-bench-collectives-{launch}"


def count_steps(cfg: Config, steps: int) -> tuple[list[dict[str, dict[str, float]]], int]:
    """Per optimizer step, the collectives this rank issued ({kind: count, payload, moved}), and
    this rank's number."""
    per_step: list[dict[str, dict[str, float]]] = []
    folder = scratch_folder()
    trainer = Trainer(quiet_run(cfg, folder, steps))
    if trainer.start_step:
        raise CheckpointError(f"{folder}: holds a checkpoint of an earlier count; remove the folder")
    counter = CollectiveCounter()
    step = trainer.train_step

    def counted(batches: list) -> Any:
        counter.reset()
        with counter:
            out = step(batches)
        per_step.append({k: dataclasses.asdict(t) for k, t in counter.tallies.items()})
        return out

    trainer.train_step = counted  # type: ignore[method-assign]
    try:
        trainer.train()
        rank = trainer.strategy.rank
    finally:
        trainer.close()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return per_step, rank


def planned(cfg: Config, world: int) -> dict[str, Any]:
    """The planner's strategy and bytes per rank per optimizer step for `cfg` on `world` ranks."""
    m = cfg.meta
    shape = model_shape(m.model_name, cfg.mask.patch_size, cfg.data.crop_size, m.pred_depth, m.pred_emb_dim,
                        m.encoder_depth)
    strategy, shards = configured_strategy(cfg.dist, world)
    accum = accumulation_steps(cfg, world)
    comm = cost_model(strategy).communication(shape, world, shards, accum, m.use_bfloat16)
    return {"strategy": strategy, "shards": shards, "accumulation": accum,
            "moved": {"all_gather": comm.all_gather, "reduce_scatter": comm.reduce_scatter,
                      "all_reduce": comm.all_reduce}}


def bench_collectives(cfg: Config, steps: int = 3) -> dict[str, Any] | None:
    """Counts `steps` optimizer steps on every rank; rank 0's report (None on the others)."""
    import torch.distributed as dist

    per_step, rank = count_steps(cfg, steps)
    world = int(dist.get_world_size()) if dist.is_initialized() else _launched_world()
    if rank != 0:
        return None
    plan = planned(cfg, world)
    last = per_step[-1]
    rows = {kind: {**last[kind], "planned": plan["moved"].get(kind)} for kind in COLLECTIVE_KINDS
            if last[kind]["count"] or plan["moved"].get(kind)}
    for row in rows.values():
        row["ratio"] = row["moved"] / row["planned"] if row["planned"] else None
    return {"world_size": world, "steps": steps, **{k: v for k, v in plan.items() if k != "moved"},
            "bf16": cfg.meta.use_bfloat16, "per_step_counts": [{k: s[k]["count"] for k in s} for s in per_step],
            "collectives": rows}


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def format_collectives(r: dict[str, Any]) -> str:
    lines = [f"bench collectives: {r['strategy']} on {r['world_size']} ranks, accumulation {r['accumulation']}, "
             f"{'bf16' if r['bf16'] else 'fp32'}; per optimizer step, rank 0 (the last of {r['steps']} steps)",
             f"{'collective':<16}{'count':>7}{'moved MB':>11}{'planned MB':>12}{'ratio':>8}"]
    for kind, row in r["collectives"].items():
        planned_mb = f"{row['planned'] / 1e6:.3f}" if row["planned"] is not None else "-"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        lines.append(f"{kind:<16}{row['count']:>7}{row['moved'] / 1e6:>11.3f}{planned_mb:>12}{ratio:>8}")
    return "\n".join(lines)
