"""Peak memory of one GPU: a strategy's state (pijepa.plan.costs) plus the activations of one
micro-step (pijepa.plan.activations), phase by phase.

Peak = the largest of eight phases: the target's, the encoder's and the predictor's forward, the
loss (every activation kept plus the loss's temporaries), the loss's backward, the predictor's
and the encoder's first block backward (what backward has released by then is gone; a
checkpointed block recomputes its activations there), optimizer step. Each phase is held to a
trace of the real step (pijepa.rehearsal, docs/scale_rehearsal.md). The table shows the
components of the peak phase. On a GPU, a margin is added: CUDA_OVERHEAD (CUDA context,
NCCL communicators and cuBLAS workspaces) plus ALLOCATOR_SLACK of the tensor peak for the caching
allocator's fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pijepa.plan.activations import DEFAULT_LOSS, LossSpec, activation_bytes
from pijepa.plan.costs import cost_model
from pijepa.plan.hardware import ALLOCATOR_SLACK, CUDA_OVERHEAD
from pijepa.plan.shapes import ModelShape, Tokens


@dataclass
class MemoryEstimate:
    """Components of the peak phase (they sum to `tensors`), the margin and every phase's total."""

    params: float
    grads: float
    optimizer: float
    ema: float
    activations: float
    transient: float
    margin: float
    peak_phase: str
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def tensors(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.activations + self.transient

    @property
    def total(self) -> float:
        return self.tensors + self.margin


def estimate_memory(shape: ModelShape, batch: int, tokens: Tokens, strategy: str, *, shards: int = 1,
                    accum: int = 1, ac: str = "none", ac_every: int = 2, bf16: bool = True,
                    attn: str = "sdpa", loss: LossSpec = DEFAULT_LOSS, device: str = "cuda") -> MemoryEstimate:
    """Peak memory of one GPU (or one CPU process) for a micro-step of `batch` images."""
    model = cost_model(strategy)
    st = model.state(shape, shards, accum, bf16, device)
    act = activation_bytes(shape, batch, tokens, model.precision(bf16), ac, ac_every, attn, loss, device)
    # Backward releases what it has used: when the predictor's first block runs, the loss and the
    # predictor head are gone; when the encoder's first block runs, the whole predictor too (its
    # gradients are there, the encoder's are coming). The target's output and the predictions are
    # gone before backward starts (Activations.at_backward).
    pred_backward = act.at_backward - act.loss - (act.predictor_head - act.predictions)
    enc_backward = act.inputs + act.encoder - act.encoder_head
    pred_weights, pred_buffers = st.in_predictor_backward()
    # (grads, activations, transient) of each phase; params, optimizer and EMA are always resident.
    phases = {
        "target forward": (st.grads_forward, act.inputs, st.weights_target + act.target_work),
        "encoder forward": (st.grads_forward, act.inputs + act.target_output + act.encoder,
                            st.weights_forward + act.encoder_forward),
        "predictor forward": (st.grads_forward, act.kept - act.loss, pred_weights + act.predictor_forward),
        "loss": (st.grads_forward, act.kept, st.around_loss() + act.loss_transient),
        "loss backward": (st.grads_forward, act.at_backward, st.around_loss() + act.loss_backward),
        "predictor backward": (st.grads_forward, pred_backward, pred_weights + pred_buffers + act.predictor_backward),
        "encoder backward": (st.grads_partial, enc_backward,
                             st.in_encoder_backward() + st.backward_buffers + act.encoder_backward),
        # the last micro-batch's images stay referenced until the step returns
        "optimizer step": (st.grads_step, act.inputs, st.step_transient),
    }
    resident = st.params + st.optimizer + st.ema
    totals = {name: resident + sum(parts) for name, parts in phases.items()}
    peak = max(totals, key=lambda name: totals[name])
    grads, activations, transient = phases[peak]
    margin = (CUDA_OVERHEAD + ALLOCATOR_SLACK * totals[peak]) if device == "cuda" else 0.0
    return MemoryEstimate(st.params, grads, st.optimizer, st.ema, activations, transient, margin, peak, totals)
