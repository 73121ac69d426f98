"""What every cost model answers, and the conventions they share.

Everything is bytes per GPU. Notation: Psi = parameters that get gradients (encoder + predictor;
the frozen positional tables excluded), P = all parameters of encoder + predictor, Pe = all
parameters of the encoder (= the EMA target), S = ranks the state is sharded over (the world size,
or the shard group of HSDP), N = world size. "bf16" is `meta.use_bfloat16`.

- Optimizer step: pijepa's AdamW is fused (CUDA and CPU) and needs no temporaries (adam_temporaries).
- Communication is per GPU per optimizer step, ring algorithms: an all-gather or reduce-scatter of
  X bytes moves X (N-1)/N per GPU, an all-reduce twice that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pijepa.plan.precision import FULL_BF16, FULL_FP32, Precision
from pijepa.plan.shapes import ModelShape


@dataclass(frozen=True)
class State:
    """Per-GPU bytes of model state and engine buffers, by when they are alive."""

    params: float
    optimizer: float
    ema: float
    grads_forward: float  # gradient memory alive during a micro-step's forward
    grads_step: float  # gradient memory alive at the optimizer step
    grads_partial: float  # gradients alive once the predictor's backward is done (encoder backward)
    weights_forward: float  # weight copies alive from the forward through the backward
    weights_target: float  # weight copies alive during the target's forward
    backward_buffers: float  # communication buffers of the backward
    step_transient: float  # optimizer temporaries and step buffers
    # The same two in the predictor's backward, where a per-block engine (FSDP) holds predictor
    # blocks, not encoder blocks, and the weights alive around the loss, where it may hold no
    # block at all; None: as in the encoder's backward.
    weights_predictor_backward: float | None = None
    buffers_predictor_backward: float | None = None
    weights_loss: float | None = None
    weights_encoder_backward: float | None = None

    def around_loss(self) -> float:
        """Weights alive during the loss and its backward."""
        return self.weights_forward if self.weights_loss is None else self.weights_loss

    def in_encoder_backward(self) -> float:
        """Weights alive in the encoder's backward."""
        return self.weights_forward if self.weights_encoder_backward is None else self.weights_encoder_backward

    def in_predictor_backward(self) -> tuple[float, float]:
        """(weights, communication buffers) alive in the predictor's backward."""
        weights, buffers = self.weights_predictor_backward, self.buffers_predictor_backward
        return (self.weights_forward if weights is None else weights,
                self.backward_buffers if buffers is None else buffers)


@dataclass(frozen=True)
class Communication:
    """Per-GPU bytes moved per optimizer step (ring algorithms), by collective."""

    all_gather: float
    reduce_scatter: float
    all_reduce: float

    @property
    def total(self) -> float:
        return self.all_gather + self.reduce_scatter + self.all_reduce


NO_COMMUNICATION = Communication(0.0, 0.0, 0.0)


def ring(size: float, ranks: int) -> float:
    """Bytes one rank moves in a ring all-gather or reduce-scatter of `size` bytes over `ranks`."""
    return size * (ranks - 1) / ranks


def adam_temporaries(shape: ModelShape, local_params: float, device: str) -> float:
    """AdamW's step temporaries: none. pijepa's AdamW is fused on CUDA and on the CPU
    (parallel.base.make_adamw): one kernel updates every element in place, where the foreach
    version would materialise sqrt(v) for the whole local shard. The trace of the step
    (pijepa.rehearsal) shows no optimizer temporaries."""
    return 0.0


class CostModel(ABC):
    """One parallel strategy's memory and traffic per GPU, registered under `name` in
    pijepa.plan.costs.COST_MODELS. Subclasses are frozen dataclasses whose fields are the
    strategy's options (FSDP's sharding, the ZeRO stage)."""

    family: ClassVar[str]  # the engine; groups the settings `assumptions` reports in `plan --json`
    note: ClassVar[str] = ""  # a sentence for the table's legend, printed once per family
    compared: bool  # whether `pijepa plan` compares it; otherwise only planned when configured

    @property
    @abstractmethod
    def name(self) -> str:
        """The key of the table and of the JSON rows (`fsdp_full`, `zero2`)."""

    @property
    @abstractmethod
    def label(self) -> str:
        """The name the table prints (`FSDP full`, `ZeRO-2`)."""

    def precision(self, bf16: bool) -> Precision:
        """Byte widths under this strategy: under bf16, the weights used in forward are bf16 (FSDP's
        param_dtype, DeepSpeed's bf16 module), so is the residual stream."""
        return FULL_BF16 if bf16 else FULL_FP32

    def default_shards(self, world: int) -> int:
        """Ranks the state is sharded over when nothing else says."""
        return world

    def assumptions(self, bf16: bool) -> dict[str, Any] | None:
        """Settings taken from outside the config (a DeepSpeed JSON's buffer sizes), for `plan --json`."""
        return None

    @abstractmethod
    def state(self, shape: ModelShape, shards: int, accum: int, bf16: bool, device: str = "cuda") -> State:
        """Model state and engine buffers of one GPU (or CPU process)."""

    @abstractmethod
    def communication(self, shape: ModelShape, world: int, shards: int, accum: int, bf16: bool) -> Communication:
        """Bytes one GPU moves per optimizer step of `accum` micro-steps."""
