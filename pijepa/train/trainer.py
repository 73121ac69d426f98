"""The training loop. It talks to a Strategy and never branches on the engine."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pijepa.config import Config, dump_config
from pijepa.dist import build_strategy
from pijepa.train.build import (accumulation_steps, build_dataset, build_loss_fn, build_models,
                                build_train_loader, loader_counters, loader_state, restore_loader_state)
from pijepa.train.checkpoint import Checkpointer, rng_state
from pijepa.train.metrics import MetricsLogger, console, peak_memory_mb
from pijepa.train.schedules import build_schedules


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.folder)
        self.strategy = build_strategy(cfg.dist.strategy, cfg)
        world, rank = self.strategy.world_size, self.strategy.rank
        self.accum = accumulation_steps(cfg, world)
        self.global_batch = cfg.data.batch_size * self.accum * world
        self.dataset = build_dataset(cfg, world)
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.dataset)} images, fewer than one optimizer step "
                             f"of data.global_batch_size {self.global_batch}")
        self.total_steps = cfg.optimization.epochs * self.steps_per_epoch
        if cfg.optimization.max_steps:
            self.total_steps = min(self.total_steps, cfg.optimization.max_steps)
        self.schedules = build_schedules(cfg.optimization, self.steps_per_epoch)

        o = cfg.optimization
        self.models = self.strategy.setup(build_models(cfg), self.accum, o.clip_grad,
                                          {"lr": o.start_lr, "weight_decay": o.weight_decay})
        self.device = self.strategy.device
        self.loss_fn = build_loss_fn(cfg)
        self.autocast = cfg.meta.use_bfloat16
        self.checkpointer = Checkpointer(self.run_dir, self.strategy, cfg.logging.keep_checkpoints)
        self.start_step = self._restore()
        if self.strategy.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, self.strategy.is_main, cfg.logging.tensorboard)
        self.loader = build_train_loader(cfg, self.dataset, accum=self.accum, world_size=world, rank=rank,
                                         start_step=self.start_step, total_steps=self.total_steps,
                                         pin_memory=cfg.data.pin_mem and self.device.type == "cuda")
        # A loader with a position of its own (webdataset) continues from the checkpointed one.
        restore_loader_state(self.loader, self._resumed.get("loader"))

    # ------------------------------------------------------------------ state

    def _restore(self) -> int:
        """Resumes from the run folder's newest checkpoint, else from meta.read_checkpoint if asked."""
        self._resumed: dict[str, Any] = {}
        folder = self.checkpointer.latest()
        if folder is None and self.cfg.meta.load_checkpoint:
            folder = Path(self.cfg.meta.read_checkpoint)
        if folder is None:
            return 0
        extra = self._resumed = self.checkpointer.load(folder)
        if self.strategy.is_main:
            console(f"resumed from {folder} at step {extra['step']}")
        return int(extra["step"])

    def _extra_state(self, next_step: int) -> dict[str, Any]:
        m, d = self.cfg.meta, self.cfg.data
        return {
            "step": next_step,  # also the data position: the sampler is addressed by step
            "loader": loader_state(self.loader),  # None, or a streaming loader's position (all ranks')
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "model": {"model_name": m.model_name, "patch_size": self.cfg.mask.patch_size,
                      "img_size": d.crop_size, "pred_depth": m.pred_depth, "pred_emb_dim": m.pred_emb_dim},
        }

    # ------------------------------------------------------------------ step

    def forward_loss(self, images: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor):
        models = self.models
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                h = models.target_encoder(images)
            z = models.predict(images, masks_enc, masks_pred)  # encoder, then predictor
            return self.loss_fn(z, h, masks_pred)

    def train_step(self, batches: list) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns detached loss, parts, grad norm."""
        step = self.step
        total = torch.zeros((), device=self.device)
        parts_sum: dict[str, torch.Tensor] = {}
        for i, (images, _labels, masks_enc, masks_pred) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            masks_enc = masks_enc.to(self.device, non_blocking=True)
            masks_pred = masks_pred.to(self.device, non_blocking=True)
            with self.strategy.micro_step(is_last=i == len(batches) - 1):
                loss, parts = self.forward_loss(images, masks_enc, masks_pred)
                self.strategy.backward(loss)
            total += loss.detach() / len(batches)
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0) + value.detach().float() / len(batches)
        grad_norm = self.strategy.optimizer_step(self.schedules.lr_at(step), self.schedules.wd_at(step))
        self.strategy.ema_update(self.schedules.momentum_at(step))
        return total, parts_sum, grad_norm

    # ------------------------------------------------------------------ loop

    def train(self) -> None:
        cfg, s = self.cfg.logging, self.strategy
        batches = iter(self.loader)
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not s.is_main,
                   desc="pretrain", unit="step", dynamic_ncols=True)
        last_log, t_log = self.start_step, time.perf_counter()
        for self.step in range(self.start_step, self.total_steps):
            micro_batches = [next(batches) for _ in range(self.accum)]
            loss, parts, grad_norm = self.train_step(micro_batches)
            done = self.step + 1
            bar.update(1)
            if s.is_main and cfg.tensorboard and cfg.mask_viz_freq and done % cfg.mask_viz_freq == 0:
                self._log_masks(micro_batches[0], done)
            if done % cfg.log_freq == 0 or done == self.total_steps:
                elapsed = time.perf_counter() - t_log
                scalars = self._scalars(loss, parts, grad_norm, (done - last_log), elapsed)
                self.metrics.log(done, scalars)
                if s.is_main:
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                    tqdm.write(_format_line(done, self.total_steps, scalars))
                last_log, t_log = done, time.perf_counter()
            if done % cfg.checkpoint_freq == 0 or done == self.total_steps:
                self.checkpointer.save(done, self._extra_state(done))
        self.checkpointer.wait()  # an asynchronous save in flight is completed before exit
        bar.close()
        self.metrics.close()

    def _log_masks(self, batch, step: int) -> None:
        """The masks this step trained on, drawn over its first images (rank 0, CPU, cheap)."""
        from pijepa.tools.viz import mask_grid_from_batch

        images, _labels, masks_enc, masks_pred = batch
        self.metrics.image("masks", mask_grid_from_batch(images, masks_enc, masks_pred,
                                                         self.cfg.mask.patch_size), step)

    def _scalars(self, loss, parts, grad_norm, steps: int, elapsed: float) -> dict[str, float]:
        # One host sync per log step: the values are reduced and read only here.
        s = self.strategy
        values = torch.stack([loss, *parts.values(), grad_norm.float().to(loss.device)])
        values = s.reduce_mean(values).tolist()
        step = self.step
        scalars = {"loss": values[0], **{f"loss_{n}": v for n, v in zip(parts, values[1:-1])},
                   "grad_norm": values[-1], "lr": self.schedules.lr_at(step),
                   "weight_decay": self.schedules.wd_at(step), "ema_momentum": self.schedules.momentum_at(step),
                   "images_per_s": steps * self.global_batch / max(elapsed, 1e-9),
                   "step_time_s": elapsed / max(steps, 1), "peak_memory_mb": peak_memory_mb(self.device)}
        counts = loader_counters(self.loader)  # cumulative per rank (e.g. data_skipped): logged summed
        if counts:
            totals = s.reduce_mean(torch.tensor([float(v) for v in counts.values()], dtype=torch.float64,
                                                device=loss.device)) * s.world_size
            scalars.update({name: round(v) for name, v in zip(counts, totals.tolist())})
        return scalars

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.strategy.close()


def _format_line(step: int, total: int, scalars: dict[str, float]) -> str:
    parts = " ".join(f"{k[5:]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss_"))
    return (f"step {step}/{total} loss={scalars['loss']:.4f} {parts} lr={scalars['lr']:.2e} "
            f"grad_norm={scalars['grad_norm']:.3f} {scalars['images_per_s']:.1f} img/s "
            f"{scalars['step_time_s']:.3f} s/step mem={scalars['peak_memory_mb']:.0f}MB")
