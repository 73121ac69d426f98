"""One optimizer step: the models as the strategy holds them, the loss and the schedules.

The trainer (trainer.py) runs it in its loop over real batches; `pijepa plan --trace`
(pijepa.rehearsal) builds and runs the same object on fake tensors at a recipe's world size."""

from __future__ import annotations

import torch

from pijepa.config import Config
from pijepa.data.transforms import normalize_batch
from pijepa.losses.registry import sum_terms
from pijepa.parallel import Strategy
from pijepa.train.build import build_loss_fn, build_models_for
from pijepa.train.diagnostics import collapse_stats, term_gradient_norms
from pijepa.train.schedules import build_schedules


class TrainStep:
    def __init__(self, cfg: Config, strategy: Strategy, accum: int, steps_per_epoch: int) -> None:
        o = cfg.optimization
        self.strategy = strategy
        self.schedules = build_schedules(o, steps_per_epoch)
        self.models = strategy.setup(build_models_for(cfg, strategy), accum, o.clip_grad,
                                     {"lr": o.start_lr, "weight_decay": o.weight_decay})
        self.device = strategy.device
        self.loss_fn = build_loss_fn(cfg, self.device)
        self.autocast = cfg.meta.use_bfloat16

    def forward_loss(self, images: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor,
                     diagnose: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The loss, its parts, and (when `diagnose`: log steps only) the diagnostics of
        train/diagnostics.py: each term's gradient norm on the predictions, the target's spread."""
        models = self.models
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                h = models.target_encoder(images)
            z = models.predict(images, masks_enc, masks_pred)  # encoder, then predictor
            terms, parts = self.loss_fn.terms(z, h, masks_pred)
            diagnostics = self._diagnostics(z, h, masks_pred) if diagnose else {}
        return sum_terms(terms), parts, diagnostics

    def _diagnostics(self, z: torch.Tensor, h: torch.Tensor, masks_pred: torch.Tensor) -> dict[str, torch.Tensor]:
        # On a detached copy of the predictions: an engine may hook its output's autograd (DeepSpeed
        # runs its gradient reduction from there), which a side gradient must not trigger.
        z_copy = z.detach().requires_grad_()
        terms, _ = self.loss_fn.terms(z_copy, h, masks_pred)
        return {**term_gradient_norms(terms, z_copy), **collapse_stats(h)}

    def run(self, step: int, batches: list, diagnose: bool = False
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Optimizer step `step` over `accum` micro-batches and the EMA update; returns the detached
        loss, its parts (with the diagnostics of the last micro-batch when `diagnose`), the gradient
        norm and whether the step was applied (not skipped as non-finite), all on the device."""
        s = self.schedules
        total = torch.zeros((), device=self.device)
        parts_sum: dict[str, torch.Tensor] = {}
        for i, (images, _labels, masks_enc, masks_pred) in enumerate(batches):
            images = normalize_batch(images.to(self.device, non_blocking=True))  # uint8 crops until here
            masks_enc = masks_enc.to(self.device, non_blocking=True)
            masks_pred = masks_pred.to(self.device, non_blocking=True)
            last = i == len(batches) - 1
            with self.strategy.micro_step(is_last=last):
                loss, parts, diagnostics = self.forward_loss(images, masks_enc, masks_pred, diagnose=last and diagnose)
                self.strategy.backward(loss)
            total += loss.detach() / len(batches)
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0) + value.detach().float() / len(batches)
        grad_norm, applied = self.strategy.optimizer_step(s.lr_for_step(step), s.wd_for_step(step))
        self.strategy.ema_update(s.momentum_for_step(step))  # skipped steps too, as the reference
        return total, {**parts_sum, **diagnostics}, grad_norm, applied
