"""FSDP2 (fully_shard), `dist.strategy: fsdp` with `dist.fsdp_sharding` full, grad_op or hybrid;
the rows of the state table are in pijepa/plan/costs/__init__.py.

- FSDP2 keeps fp32 sharded parameters (the optimizer and the EMA work on them) and all-gathers
  bf16 copies for compute (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)). Transient:
  `full` holds two blocks gathered at a time (the running one and the prefetched next); `grad_op`
  keeps every gathered bf16 parameter from forward to backward (2P). The root parameters (patch
  embedding, norms, predictor projections) stay gathered. In backward each block adds its
  unsharded bf16 gradient and the fp32 reduce-scatter input. The EMA target is sharded like the
  encoder. `hybrid` is `full` within a shard group of S ranks, replicated across the groups.
- Gradient accumulation: pijepa skips gradient synchronisation on all but the last micro-step;
  FSDP2 then keeps the UNSHARDED gradients, upcast to the fp32 reduce dtype (4Psi, not 4Psi/S),
  until the last micro-step reduce-scatters them; and the encoder's and predictor's parameters,
  gathered once in the first micro-step's forward, stay gathered until the last backward
  (set_reshard_after_forward/backward False). Why this and not the alternatives, per GPU per
  optimizer step with A micro-steps, P = encoder + predictor parameters, Pe = encoder (target):
    re-gather every micro-step, sync at the end (pijepa before): AG A(2P + Pe)w, RS 4Psi; holds 4Psi
    sync every micro-step (grads stay sharded):                   AG A(2P + Pe)w, RS A 4Psi
    gathered across micro-steps, sync at the end (pijepa now):     AG (P + A Pe)w, RS 4Psi; holds 4Psi + Pw
  At A = 4 in bf16 (w = 2): 28, 40 and 14 Psi-bytes (Pe ~ P); the last costs Pw (1.3 GB for
  ViT-H/14, 2 GB for ViT-g/16) more memory than the first. Accumulation is what a run uses when
  the per-GPU batch does not fit, so the memory is counted (forward weights P w below) and the plan
  picks a micro-batch with it; FSDP still prefers accumulation 1, which the recipes use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pijepa.parallel.options import DistConfig, FsdpSharding
from pijepa.plan.costs.base import Communication, CostModel, State, adam_temporaries, ring
from pijepa.plan.precision import BF16, FP32
from pijepa.plan.shapes import ModelShape

NODE_GPUS = 8  # GPUs of one node: the shard group of `hybrid` when dist.hybrid_shard_size is 0


@dataclass(frozen=True)
class FsdpCost(CostModel):
    sharding: FsdpSharding
    compared: bool = True

    family: ClassVar[str] = "fsdp"

    @property
    def name(self) -> str:
        return f"fsdp_{self.sharding}"

    @property
    def label(self) -> str:
        return f"FSDP {self.sharding}"

    @property
    def reshards_after_forward(self) -> bool:
        """Whether gathered blocks are freed after forward (and gathered again for backward)."""
        return self.sharding != "grad_op"

    def state(self, shape: ModelShape, shards: int, accum: int, bf16: bool, device: str = "cuda") -> State:
        psi, p_all, pe, s = shape.trainable_params, shape.params, shape.encoder_params, shards
        pred_trainable = psi - shape.encoder_trainable
        enc_block, pred_block = shape.encoder.block_params, shape.predictor.block_params
        w = self.precision(bf16).weights
        accumulating = accum > 1
        root = (shape.root_params + shape.fsdp_padding(s)) * w  # root units stay gathered from forward to backward
        keeps_all = accumulating or not self.reshards_after_forward
        # Gathered from the first forward to the last backward (accumulation), or every block until
        # its backward (grad_op); else the running block and the prefetched next one.
        forward = p_all * w if keeps_all else 2 * enc_block * w + root
        in_predictor = p_all * w if keeps_all else 2 * pred_block * w + root
        # the encoder's backward starts once the predictor's blocks are resharded
        in_encoder = (p_all - shape.predictor.depth * pred_block) * w if keeps_all else forward
        # the target runs first; with accumulation, the next micro-steps run it beside the gathered model
        target = 2 * enc_block * w + (p_all * w if accumulating else 0.0)
        # Without sync, FSDP2 keeps unsharded gradients upcast to the fp32 reduce dtype.
        unsharded = psi * FP32 if accumulating else 0.0
        return State(
            params=p_all * FP32 / s, optimizer=2 * psi * FP32 / s, ema=pe * FP32 / s,
            grads_forward=unsharded, grads_step=psi * FP32 / s,
            grads_partial=unsharded if accumulating else pred_trainable * FP32 / s,
            weights_forward=forward, weights_target=target,
            # A block's backward: the fp32 reduce-scatter input (its unsharded bf16 gradient is
            # freed once copied into it).
            backward_buffers=enc_block * FP32,
            step_transient=adam_temporaries(shape, psi / s, device),
            # the peak of the predictor's backward is its first block: no reduce-scatter is in flight yet
            weights_predictor_backward=in_predictor, buffers_predictor_backward=0.0,
            weights_loss=p_all * w if keeps_all else root, weights_encoder_backward=in_encoder)

    def communication(self, shape: ModelShape, world: int, shards: int, accum: int, bf16: bool) -> Communication:
        psi, p_all, pe, s = shape.trainable_params, shape.params, shape.encoder_params, shards
        w = BF16 if bf16 else FP32
        # Each micro-step gathers the target for its forward. Without accumulation encoder +
        # predictor are gathered for forward and, under `full`, again in backward; with it, once
        # per optimizer step (kept gathered across micro-steps). The fp32 reduce-scatter runs once.
        # A one-row parameter is gathered padded to a row per rank (ModelShape.fsdp_padding); the
        # roots stay gathered for backward, so only the blocks are gathered again there.
        trained, target = p_all + shape.fsdp_padding(s), accum * (pe + shape.fsdp_padding(s, predictor=False))
        if accum > 1:
            gathers = trained + target
        else:
            gathers = trained + target + (p_all - shape.root_params if self.reshards_after_forward else 0)
        replicas = world // s
        across = 2 * ring(psi * FP32 / s, replicas) if replicas > 1 else 0.0  # HSDP: all-reduce of shards
        return Communication(ring(gathers * w, s), ring(psi * FP32, s), across)


def configured(dist: DistConfig, gpus: int) -> tuple[str, int]:
    """(cost model, shard ranks) of `dist.strategy: fsdp`."""
    if dist.fsdp_sharding == "hybrid":
        return "fsdp_hybrid", dist.hybrid_shard_size or min(NODE_GPUS, gpus)  # 0: the GPUs of one node
    return f"fsdp_{dist.fsdp_sharding}", gpus
