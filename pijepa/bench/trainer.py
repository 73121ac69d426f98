"""`pijepa bench trainer`: the real trainer against the bare step, at the same shapes, in one run.

Three rows, each timed over `steps` steps after as many untimed ones:
- `baseline`: the original design's step (`bench step`'s baseline: explicit softmax attention, the
  plain loss, foreach AdamW) on fixed tensors;
- `bench step`: pijepa's step on fixed tensors (SDPA, the loss path `optimization.fused_loss: auto`
  picks for the device, fused AdamW), nothing around it;
- `pijepa train`: the Trainer itself (single strategy, synthetic images through the DataLoader with
  its workers, masks drawn per step, a log line at the end of the timed window), timed by its own
  `step_time_s`, which covers everything between two log steps.
The trainer / bench step ratio is what the surroundings cost (or save); baseline rows give scale.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import torch

from pijepa.bench.step import bench_step
from pijepa.config import load_config
from pijepa.train.build import use_fused_loss
from pijepa.train.trainer import Trainer


def trainer_sets(model: str, patch: int, img: int, batch: int, pred_depth: int, pred_dim: int,
                 workers: int, steps: int, folder: Path) -> list[str]:
    """`--set` items for a trainer run at these shapes: `steps` untimed steps, then `steps` timed
    ones; a log line (with its diagnostics) at the end of each, as a run with log_freq `steps`
    has; no TensorBoard, no checkpoint but the last."""
    warmup = steps
    return [
        "data.dataset=synthetic", f"data.synthetic_images={batch * (warmup + steps)}", f"data.batch_size={batch}",
        f"data.crop_size={img}", f"data.num_workers={workers}", "data.pin_mem=false", f"mask.patch_size={patch}",
        f"meta.model_name={model}", f"meta.pred_depth={pred_depth}", f"meta.pred_emb_dim={pred_dim}",
        "meta.use_bfloat16=false", "optimization.loss_function=L2_PKT", "optimization.epochs=1",
        "optimization.warmup=0", f"optimization.max_steps={warmup + steps}", f"logging.log_freq={warmup}",
        f"logging.check_freq={warmup + steps}", f"logging.checkpoint_freq={warmup + steps}",
        "logging.tensorboard=false", "logging.mask_viz_freq=0", f"logging.folder={folder}"]


def trainer_step_s(sets: list[str], warmup: int) -> float:
    """Mean seconds per step after `warmup` steps, from the trainer's own metrics.csv (step_time_s
    of a row: seconds per step since the previous log row)."""
    cfg = load_config(None, sets)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    with (Path(cfg.logging.folder) / "metrics.csv").open() as f:
        rows = [(int(r["step"]), float(r["step_time_s"])) for r in csv.DictReader(f)]
    timed = [(step, s) for step, s in rows if step > warmup]
    prev = [warmup] + [step for step, _ in timed[:-1]]
    total = sum(s * (step - p) for (step, s), p in zip(timed, prev))
    return total / (timed[-1][0] - warmup)


def bench_trainer(model: str = "vit_small", patch: int = 16, img: int = 224, batch: int = 8, pred_depth: int = 6,
                  pred_dim: int = 384, workers: int = 1, steps: int = 4) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pijepa-bench-trainer-") as tmp:
        sets = trainer_sets(model, patch, img, batch, pred_depth, pred_dim, workers, steps, Path(tmp))
        fused = use_fused_loss(load_config(None, sets), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        variant = "sdpa+fused" if fused else "sdpa"
        step = bench_step(model, patch, img, batch, pred_depth, pred_dim, variants=("baseline", variant),
                          warmup=steps, repeats=steps)
        trainer_s = trainer_step_s(sets, steps)
    base, bare = (r["step_s"] for r in step["results"])
    rows = [{"what": "baseline (original design)", "step_s": base},
            {"what": f"bench step ({variant})", "step_s": bare},
            {"what": f"pijepa train (single, {workers} loader worker(s))", "step_s": trainer_s}]
    for r in rows:
        r.update(images_per_s=batch / r["step_s"], vs_baseline=base / r["step_s"])
    return {"device": step["device"], "model": step["model"], "batch": batch, "tokens": step["tokens"],
            "rows": rows, "trainer_vs_bench_step": bare / trainer_s}
