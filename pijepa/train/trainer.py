"""The training loop. It talks to a Strategy and never branches on the engine."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pijepa.config import Config, dump_config
from pijepa.masks.viz import mask_grid_from_batch
from pijepa.runtime.errors import DataError, NonFiniteError
from pijepa.runtime.log import console, warn
from pijepa.runtime.memory import peak_memory_mb
from pijepa.runtime.signals import PREEMPTED_EXIT_CODE, PreemptionFlag
from pijepa.runtime.watchdog import StepWatchdog
from pijepa.train.auto_batch import agree_on_batch, resolve_batch_size
from pijepa.train.build import (
    accumulation_steps,
    build_dataset,
    build_strategy_for,
    build_train_loader,
    epoch_samples,
    loader_counters,
    loader_state,
    model_entry,
    restore_loader_state,
)
from pijepa.train.checkpoint import Checkpointer, rng_state
from pijepa.train.metrics import MetricsLogger
from pijepa.train.skips import SkipCounter
from pijepa.train.step import TrainStep

LOSS_PARTS = ("l2", "pkt")  # logged as loss_l2, loss_pkt; the other parts are diagnostics


class Trainer:
    def __init__(self, cfg: Config):
        # data.batch_size auto becomes a number first: DeepSpeed's batch keys are built from it.
        cfg, batch_note = resolve_batch_size(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.folder)
        self.strategy = build_strategy_for(cfg)
        world, rank = self.strategy.world_size, self.strategy.rank
        if batch_note:
            agree_on_batch(self.strategy, cfg)
            if self.strategy.is_main:
                console(batch_note)
        self.accum = accumulation_steps(cfg, world)
        self.global_batch = cfg.data.micro_batch * self.accum * world
        self.dataset = build_dataset(cfg, world)
        samples = epoch_samples(self.dataset)
        self.steps_per_epoch = samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the dataset has {samples} images, fewer than one optimizer step "
                             f"of data.global_batch_size {self.global_batch}")
        self.total_steps = cfg.optimization.epochs * self.steps_per_epoch
        if cfg.optimization.max_steps:
            self.total_steps = min(self.total_steps, cfg.optimization.max_steps)
        self.stepper = TrainStep(cfg, self.strategy, self.accum, self.steps_per_epoch)
        self.models, self.schedules, self.device = self.stepper.models, self.stepper.schedules, self.stepper.device
        self.checkpointer = Checkpointer(self.run_dir, self.strategy, cfg.logging.keep_checkpoints)
        self.watchdog = StepWatchdog(cfg.dist.step_timeout_s, self.run_dir, rank)
        self.last_checkpoint: Path | None = None
        self.skips, self.skipped_steps = SkipCounter(self.device), 0
        self.start_step = self._restore()
        self.step = self.start_step  # the step in progress (the next one until the loop starts)
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
        """Resumes from the run folder's newest readable checkpoint, else from
        meta.read_checkpoint if asked (that one must load: a mistake there is the user's)."""
        self._resumed: dict[str, Any] = {}
        found = self.checkpointer.resume()
        read = self.cfg.meta.read_checkpoint  # set whenever meta.load_checkpoint is (config checks it)
        if found is None and self.cfg.meta.load_checkpoint and read:
            found = Path(read), self.checkpointer.load(Path(read))
        if found is None:
            return 0
        folder, self._resumed = found
        self.last_checkpoint = folder
        if self.strategy.is_main:
            console(f"resumed from {folder} at step {self._resumed['step']}")
        return int(self._resumed["step"])

    def _extra_state(self, next_step: int) -> dict[str, Any]:
        return {
            "step": next_step,  # also the data position: the sampler is addressed by step
            "loader": loader_state(self.loader),  # None, or a streaming loader's position (all ranks')
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "model": model_entry(self.cfg),
        }

    # ------------------------------------------------------------------ step

    def train_step(self, batches: list) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One optimizer step (train/step.py), with the diagnostics on log steps."""
        return self.stepper.run(self.step, batches, diagnose=self._is_log_step(self.step + 1))

    def _is_log_step(self, done: int) -> bool:
        return done % self.cfg.logging.log_freq == 0 or done == self.total_steps

    # ------------------------------------------------------------------ loop

    def train(self) -> int:
        """Runs to the last step; returns 0, or PREEMPTED_EXIT_CODE after a preemption signal
        (a checkpoint of the last finished step is saved first)."""
        preemption = PreemptionFlag().install()
        try:
            return self._train_loop(preemption)
        finally:
            preemption.uninstall()
            with self.watchdog.phase("save", self.step):
                self.checkpointer.wait()  # an asynchronous save in flight is completed before exit
            self.watchdog.close()
            self.metrics.close()

    def _train_loop(self, preemption: PreemptionFlag) -> int:
        s = self.strategy
        with tqdm(total=self.total_steps, initial=self.start_step, disable=not s.is_main, desc="pretrain",
                  unit="step", dynamic_ncols=True) as bar:
            batches = iter(self.loader)
            self._t_log, self._last_log = time.perf_counter(), self.start_step
            watch = self.watchdog.phase  # a phase that outlasts dist.step_timeout_s ends this rank
            for step in range(self.start_step, self.total_steps):
                self.step = step
                with watch("data", step):
                    micro_batches = [next(batches) for _ in range(self.accum)]
                with watch("step", step):
                    loss, parts, grad_norm, applied = self.train_step(micro_batches)
                done = step + 1
                bar.update(1)
                self.skips.add(applied)
                saving = done % self.cfg.logging.checkpoint_freq == 0 or done == self.total_steps
                # The host reads the device and asks every rank only at check points, not every step.
                check = saving or self._is_log_step(done) or done % self.cfg.logging.check_freq == 0
                with watch("check", step):
                    if check:
                        self._check_skips(done, loss, parts)
                    self._log(done, micro_batches, loss, parts, grad_norm, bar)
                    preempted = check and s.any_rank(preemption.requested)
                    self.checkpointer.poll()  # an async save in flight is completed once every rank wrote it
                if saving or preempted:
                    with watch("save", step):
                        self._save(done)
                if preempted:
                    if s.is_main:
                        console(f"preempted ({preemption.signal_name or 'signal on another rank'}): saved "
                                f"step {done} to {self.last_checkpoint}; exiting with code "
                                f"{PREEMPTED_EXIT_CODE}, rerun the same command to resume")
                    return PREEMPTED_EXIT_CODE
        return 0

    def _log(self, done: int, micro_batches: list, loss, parts, grad_norm, bar) -> None:
        cfg, s = self.cfg.logging, self.strategy
        if s.is_main and cfg.tensorboard and cfg.mask_viz_freq and done % cfg.mask_viz_freq == 0:
            self._log_masks(micro_batches[0], done)
        if self._is_log_step(done):
            elapsed = time.perf_counter() - self._t_log
            scalars = self._scalars(loss, parts, grad_norm, (done - self._last_log), elapsed)
            self.metrics.log(done, scalars)
            if s.is_main:
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                console(_format_line(done, self.total_steps, scalars))
            self._last_log, self._t_log = done, time.perf_counter()

    def _save(self, done: int) -> None:
        # Skipped steps leave the parameters as they were, so this holds unless an engine applied
        # a non-finite update itself; then nothing is saved and the run stops.
        if not self.strategy.parameters_finite():
            raise NonFiniteError(f"step {done}: parameters are not finite; not saved. Last good checkpoint: "
                                 f"{self.last_checkpoint or 'none'}")
        self.last_checkpoint = self.checkpointer.save(done, self._extra_state(done))

    def _check_skips(self, done: int, loss: torch.Tensor, parts: dict) -> None:
        """Warns about the steps skipped as non-finite since the last check; stops after
        optimization.max_nonfinite_steps in a row (the counts live on the device: one read)."""
        counts = self.skips.read()
        new, self.skipped_steps = counts.total - self.skipped_steps, counts.total
        if not new and counts.worst_in_a_row == 0:
            return
        values = " ".join(f"{k}={float(v):.4g}" for k, v in {"loss": loss, **parts}.items())
        limit = self.cfg.optimization.max_nonfinite_steps
        if counts.worst_in_a_row >= limit:
            raise NonFiniteError(
                f"step {done}: loss or gradients not finite for {limit} steps in a row "
                f"(optimization.max_nonfinite_steps); this rank's loss: {values}. Last good checkpoint: "
                f"{self.last_checkpoint or 'none'}")
        if new and self.strategy.is_main:
            what = "step skipped" if new == 1 else f"{new} steps skipped since the last check"
            warn(f"step {done}: non-finite loss or gradients ({values}); {what} ({counts.in_a_row} in a row "
                 f"now, {counts.total} in this process)")

    def _log_masks(self, batch, step: int) -> None:
        """The masks this step trained on, drawn over its first images (rank 0, CPU, cheap)."""

        images, _labels, masks_enc, masks_pred = batch
        self.metrics.image("masks", mask_grid_from_batch(images[:8], masks_enc, masks_pred,
                                                         self.cfg.mask.patch_size), step)

    def _scalars(self, loss, parts, grad_norm, steps: int, elapsed: float) -> dict[str, float]:
        # One host sync per log step: the values are reduced and read only here.
        s = self.strategy
        stacked = torch.stack([loss, *parts.values(), grad_norm.float().to(loss.device)])
        values = s.reduce_mean(stacked).tolist()
        step = self.step
        named = dict(zip(parts, values[1:-1]))
        scalars = {"loss": values[0], **{f"loss_{n}": v for n, v in named.items() if n in LOSS_PARTS},
                   **{n: v for n, v in named.items() if n not in LOSS_PARTS},
                   "grad_norm": values[-1], "lr": self.schedules.lr_for_step(step),
                   "weight_decay": self.schedules.wd_for_step(step),
                   "ema_momentum": self.schedules.momentum_for_step(step),
                   "images_per_s": steps * self.global_batch / max(elapsed, 1e-9),
                   "step_time_s": elapsed / max(steps, 1), "peak_memory_mb": peak_memory_mb(self.device),
                   "skipped_steps": self.skipped_steps}
        counts = loader_counters(self.loader)  # cumulative per rank (e.g. data_skipped): logged summed
        if counts:
            totals = s.reduce_mean(torch.tensor([float(v) for v in counts.values()], dtype=torch.float64,
                                                device=loss.device)) * s.world_size
            scalars.update({name: round(v) for name, v in zip(counts, totals.tolist())})
        return scalars

    def close(self) -> None:
        """Releases the loader (its workers stop), the step and the models, then closes the strategy
        (the process group last: Strategy.close), the same on every path."""
        for name in ("loader", "stepper", "models"):
            self.__dict__.pop(name, None)
        with contextlib.suppress(Exception):
            self.strategy.close()


def _format_line(step: int, total: int, scalars: dict[str, float]) -> str:
    parts = " ".join(f"{k[5:]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss_"))
    if "grad_share_pkt" in scalars:  # how much of the push on the predictions comes from PKT
        parts += f" pkt_share={scalars['grad_share_pkt']:.2%}"
    return (f"step {step}/{total} loss={scalars['loss']:.4f} {parts} lr={scalars['lr']:.2e} "
            f"grad_norm={scalars['grad_norm']:.3f} {scalars['images_per_s']:.1f} img/s "
            f"{scalars['step_time_s']:.3f} s/step mem={scalars['peak_memory_mb']:.0f}MB")
