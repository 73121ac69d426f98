"""I-JEPA's schedules as pure functions of the optimizer step: the step alone restores them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedules:
    """Learning rate (linear warm-up then cosine), weight decay (cosine) and EMA momentum (linear).

    `total` is the schedules' horizon, `ipe_scale` x epochs x iterations per epoch, which may be
    longer than the steps actually trained (I-JEPA's `ipe_scale` stretches the schedules).
    """

    warmup_steps: int
    total: int
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema: tuple[float, float]

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + step / max(1, self.warmup_steps) * (self.lr - self.start_lr)
        progress = (step - self.warmup_steps) / max(1, self.total - self.warmup_steps)
        return max(self.final_lr, self.final_lr + (self.lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))

    def wd_at(self, step: int) -> float:
        progress = step / max(1, self.total)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        wd = self.final_weight_decay + (self.weight_decay - self.final_weight_decay) * cosine
        lo, hi = sorted((self.weight_decay, self.final_weight_decay))
        return min(hi, max(lo, wd))

    def momentum_at(self, step: int) -> float:
        start, end = self.ema
        return min(end, start + step * (end - start) / max(1, self.total))

    # What optimizer step k (0-based) uses, as in I-JEPA's loop: it calls scheduler.step() and
    # wd_scheduler.step() (which advance to position k + 1, then set the value) before each
    # optimizer step, and takes the momentum for the EMA from a generator started at 0 after it.
    # So the first step already has start_lr + (lr - start_lr) / warmup_steps and the last one
    # reaches final_lr.

    def lr_for_step(self, k: int) -> float:
        return self.lr_at(k + 1)

    def wd_for_step(self, k: int) -> float:
        return self.wd_at(k + 1)

    def momentum_for_step(self, k: int) -> float:
        return self.momentum_at(k)


def build_schedules(opt, steps_per_epoch: int) -> Schedules:
    """From the `optimization` config section and the iterations per epoch."""
    return Schedules(
        warmup_steps=int(opt.warmup * steps_per_epoch),
        total=int(opt.ipe_scale * opt.epochs * steps_per_epoch),
        start_lr=opt.start_lr, lr=opt.lr, final_lr=opt.final_lr,
        weight_decay=opt.weight_decay, final_weight_decay=opt.final_weight_decay,
        ema=tuple(opt.ema),
    )
