"""single and DDP: every rank holds the whole model state (`dist.strategy` single or ddp); their
rows of the state table are in pijepa/plan/costs/__init__.py.

- Under bf16 autocast: autocast caches one bf16 cast of every trainable weight for the forward and
  the autograd graph keeps it for backward (2Psi). The residual stream is fp32 here (fp32
  positional table + bf16 branch outputs), unlike under FSDP and DeepSpeed, where all weights,
  positional tables included, are bf16.
- Gradient accumulation: pijepa skips gradient synchronisation on all but the last micro-step;
  DDP then keeps 4Psi of param.grad between micro-steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pijepa.parallel.options import DistConfig
from pijepa.plan.costs.base import NO_COMMUNICATION, Communication, CostModel, State, adam_temporaries, ring
from pijepa.plan.precision import BF16, FP32, FULL_FP32, Precision
from pijepa.plan.shapes import ModelShape


@dataclass(frozen=True)
class ReplicatedCost(CostModel):
    ddp: bool  # DDP (flat gradient buckets, one all-reduce per step) or one process without a wrapper
    compared: bool = True

    family: ClassVar[str] = "replicated"

    @property
    def name(self) -> str:
        return "ddp" if self.ddp else "single"

    @property
    def label(self) -> str:
        return "DDP" if self.ddp else "single"

    def precision(self, bf16: bool) -> Precision:
        return Precision(BF16, FP32, BF16) if bf16 else FULL_FP32  # fp32 weights under autocast: fp32 residual

    def default_shards(self, world: int) -> int:
        return 1

    def state(self, shape: ModelShape, shards: int, accum: int, bf16: bool, device: str = "cuda") -> State:
        psi, p_all, pe = shape.trainable_params, shape.params, shape.encoder_params
        pred_trainable = psi - shape.encoder_trainable
        block = max(shape.encoder.block_params, shape.predictor.block_params)
        accumulating = accum > 1
        grads = psi * FP32
        bucket = grads if self.ddp else 0.0  # DDP's flat gradient buckets (not views)
        return State(
            params=p_all * FP32, optimizer=2 * psi * FP32, ema=pe * FP32,
            grads_forward=bucket + (grads if accumulating else 0.0), grads_step=bucket + grads,
            grads_partial=bucket + (grads if accumulating else pred_trainable * FP32),
            weights_forward=psi * BF16 if bf16 else 0.0,  # autocast's cache of bf16 weight casts
            weights_target=block * BF16 if bf16 else 0.0,  # per-op casts of the frozen target
            backward_buffers=0.0, step_transient=adam_temporaries(shape, psi, device))

    def communication(self, shape: ModelShape, world: int, shards: int, accum: int, bf16: bool) -> Communication:
        if not self.ddp:
            return NO_COMMUNICATION
        # fp32 gradients all-reduced once, on the last micro-step
        return Communication(0.0, 0.0, 2 * ring(shape.trainable_params * FP32, world))


def configured(dist: DistConfig, gpus: int) -> tuple[str, int]:
    """(cost model, shard ranks) of `dist.strategy` single or ddp: DDP from two GPUs on."""
    return ("single" if gpus == 1 else "ddp"), 1
