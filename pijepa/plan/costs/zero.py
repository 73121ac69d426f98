"""DeepSpeed ZeRO-1/2/3 (pijepa/parallel/deepspeed.py, ds_configs/), `dist.strategy: deepspeed`;
the rows of the state table are in pijepa/plan/costs/__init__.py.

- DeepSpeed bf16: the engine holds bf16 module weights; the ZeRO optimizer holds fp32 master
  weights and AdamW m, v (the ZeRO paper's K = 12 bytes per parameter), partitioned over N; pijepa
  sets `data_types.grad_accum_dtype: fp32`, so gradients accumulate in fp32: in a full buffer at
  ZeRO-1 (DeepSpeed's BF16_Optimizer), in the rank's partition from ZeRO-2. Buffers, from the
  packaged ds_configs/zero{1,2,3}_{bf16,fp32}.json (DeepSpeed's defaults where a key is absent):
  ZeRO-2/3 pass each micro-step's bf16 gradients through the reduce bucket (two with
  overlap_comm); ZeRO-1 all-reduces its fp32 buffer in buckets of that size at the step; ZeRO-1/2
  all-gather the updated bf16 weights through the all-gather bucket. ZeRO-3 keeps what its forward
  gathered until the backward when stage3_max_reuse_distance and stage3_max_live_parameters
  allow (pijepa's JSONs: 1e9 elements, more than ViT-H/14 with its predictor): the whole model,
  gathered once per micro-step; otherwise two gathered blocks plus the prefetch bucket, gathered
  again for backward. Buckets are capped at the model's size. The bf16 gradients that autograd
  produces before they reach the fp32 buffers are not counted (they live per bucket).
- Collectives, as `pijepa bench collectives` counts them on real ranks (docs/scale_rehearsal.md):
  ZeRO-2 reduces each gradient bucket with one all-reduce, every rank keeping its partition
  (DeepSpeed's use_multi_rank_bucket_allreduce), so it moves twice a reduce-scatter's bytes;
  ZeRO-3 reduce-scatters.
- Gradients are reduced in `communication_data_type` (pijepa's default fp32, as FSDP; the JSON
  may say bf16): with bf16 weights and fp32 reduction, ZeRO-2/3 cast the bucket being reduced to
  fp32 (one more bucket, in fp32) and move 4 bytes per gradient element.
- EMA target under DeepSpeed: outside the engine, fp32, following the fp32 master weights.
  ZeRO-1/2: replicated (4Pe on every rank); under bf16 each step assembles the encoder's fp32
  master weights from the partitions (an all-reduce of its trained parameters in fp32, a few
  parameters at a time: at most `EMA_CHUNK` elements in flight). ZeRO-3: partitioned by a second,
  optimizer-less ZeRO-3 engine (4Pe/N), whose forward gathers fp32 blocks (counted as transient
  and as communication); its update reads the local master partitions (no traffic).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from pijepa.parallel.deepspeed_config import read_ds_json
from pijepa.parallel.options import DistConfig
from pijepa.plan.costs.base import Communication, CostModel, State, adam_temporaries, ring
from pijepa.plan.precision import BF16, FP32
from pijepa.plan.shapes import ModelShape
from pijepa.runtime.errors import ConfigError
from pijepa.runtime.resources import resolve_packaged

DEFAULT_STAGE = 2  # DeepSpeed JSON without zero_optimization.stage, as pijepa.parallel.deepspeed reads it
EMA_CHUNK = 1 << 26  # elements of fp32 master weights the ZeRO-1/2 bf16 EMA assembles at a time


@dataclass(frozen=True)
class DSSettings:
    """The DeepSpeed JSON's buffer settings that cost memory (elements; DeepSpeed's defaults)."""

    reduce_bucket: float = 5e8
    allgather_bucket: float = 5e8
    prefetch_bucket: float = 5e7
    overlap_comm: bool = False
    fp32_reduction: bool = True  # communication_data_type fp32 (pijepa's default) or bf16
    # ZeRO-2 reduces a bucket of gradients with one all-reduce, each rank keeping its partition
    # (DeepSpeed's use_multi_rank_bucket_allreduce, on by default), else with a reduce per owner.
    bucket_allreduce: bool = True
    # ZeRO-3 keeps a gathered parameter until backward when it is reused within this many elements
    # and no more than this many are gathered at once (stage3_max_reuse_distance, _live_parameters).
    max_reuse_distance: float = 1e9
    max_live_parameters: float = 1e9

    @classmethod
    def from_json(cls, path: Path) -> DSSettings:
        raw = read_ds_json(path)
        zero = raw.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        return cls(float(zero.get("reduce_bucket_size", cls.reduce_bucket)),
                   float(zero.get("allgather_bucket_size", cls.allgather_bucket)),
                   float(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket)),
                   bool(zero.get("overlap_comm", stage == 3)),  # DeepSpeed turns it on for stage 3
                   str(raw.get("communication_data_type", "fp32")).lower() != "bf16",
                   bool(zero.get("use_multi_rank_bucket_allreduce", cls.bucket_allreduce)),
                   float(zero.get("stage3_max_reuse_distance", cls.max_reuse_distance)),
                   float(zero.get("stage3_max_live_parameters", cls.max_live_parameters)))

    def keeps_gathered(self, params: float) -> bool:
        """Whether ZeRO-3 keeps a model of `params` elements gathered from its forward to its
        backward (gathering it once per micro-step, not twice)."""
        return params <= min(self.max_reuse_distance, self.max_live_parameters)

    @classmethod
    def for_stage(cls, stage: int, bf16: bool) -> DSSettings:
        """From the packaged ds_configs/zero{stage}_{bf16,fp32}.json, else DeepSpeed's defaults."""
        return _packaged_settings(stage, bf16)


@functools.lru_cache(maxsize=8)
def _packaged_settings(stage: int, bf16: bool) -> DSSettings:
    try:
        path = resolve_packaged(f"zero{stage}_{'bf16' if bf16 else 'fp32'}", kind="deepspeed")
    except ConfigError:
        return DSSettings(overlap_comm=stage == 3)
    return DSSettings.from_json(path)


@dataclass(frozen=True)
class ZeroCost(CostModel):
    stage: int  # 1, 2 or 3
    ds: DSSettings | None = None  # buffer sizes; None: those of the packaged JSON of the stage
    compared: bool = True

    family: ClassVar[str] = "deepspeed"
    note: ClassVar[str] = "ZeRO rows use the buffer sizes of ds_configs/zero{1,2,3}_*.json."

    @property
    def name(self) -> str:
        return f"zero{self.stage}"

    @property
    def label(self) -> str:
        return f"ZeRO-{self.stage}"

    def settings(self, bf16: bool) -> DSSettings:
        return self.ds or DSSettings.for_stage(self.stage, bf16)

    def assumptions(self, bf16: bool) -> dict[str, Any]:
        return asdict(self.settings(bf16))

    def state(self, shape: ModelShape, shards: int, accum: int, bf16: bool, device: str = "cuda") -> State:
        psi, p_all, pe, n, stage = shape.trainable_params, shape.params, shape.encoder_params, shards, self.stage
        ds = self.settings(bf16)
        w = self.precision(bf16).weights
        master = FP32 if bf16 else 0  # fp32 master weights exist only under mixed precision
        # Gradients accumulate in fp32 (pijepa sets data_types.grad_accum_dtype fp32 under bf16):
        # ZeRO-1 (DeepSpeed's BF16_Optimizer) in a full fp32 buffer, ZeRO-2/3 in fp32 partitions.
        grads = psi * FP32 if stage == 1 else psi * FP32 / n
        # ZeRO-2/3 send each micro-step's bf16 gradients through the reduce bucket (two with
        # overlap_comm) and reduce a bucket in the communication dtype (an fp32 copy under bf16
        # weights); ZeRO-1 all-reduces the fp32 buffer in buckets of the same size at the step.
        bucket = min(ds.reduce_bucket, psi)
        ipg = bucket * w * (2 if ds.overlap_comm else 1) + (bucket * FP32 if bf16 and ds.fp32_reduction else 0.0)
        # ZeRO-1/2 bf16 EMA: the fp32 master weights of up to EMA_CHUNK elements at a time.
        ema_master = min(EMA_CHUNK, shape.encoder_trainable) * FP32 if bf16 and stage < 3 else 0.0
        gather_bucket = min(ds.allgather_bucket, p_all) * w  # updated bf16 parameters after the step
        weights_forward, weights_target = self._gathered_weights(shape, ds, w, bf16)
        step_buffers = (min(ds.reduce_bucket, psi) * FP32 if stage == 1 else 0.0) + (
            gather_bucket if stage < 3 else 0.0)
        return State(
            params=p_all * w / (n if stage == 3 else 1), optimizer=psi * (master + 2 * FP32) / n,
            ema=pe * FP32 / (n if stage == 3 else 1),
            grads_forward=grads, grads_step=grads, grads_partial=grads,
            weights_forward=weights_forward, weights_target=weights_target,
            backward_buffers=ipg if stage > 1 else 0.0,
            # the EMA runs after the step, once its temporaries and buffers are gone
            step_transient=max(adam_temporaries(shape, psi / n, device) + step_buffers, ema_master))

    def _gathered_weights(self, shape: ModelShape, ds: DSSettings, w: int, bf16: bool) -> tuple[float, float]:
        """(weights alive from forward through backward, weights alive in the target's forward)."""
        if self.stage < 3:
            return 0.0, (shape.encoder.block_params * BF16 if bf16 else 0.0)  # autocast's per-op casts
        # The whole model stays gathered from forward to backward when DeepSpeed's reuse limits
        # allow it (DSSettings.keeps_gathered), else the running and the next block plus the
        # prefetch bucket; the EMA target is a second ZeRO-3 engine (fp32, partitioned): its
        # forward gathers in fp32.
        block = max(shape.encoder.block_params, shape.predictor.block_params)
        forward = (shape.params * w if ds.keeps_gathered(shape.params)
                   else 2 * block * w + min(ds.prefetch_bucket, shape.params) * w)
        target = 2 * shape.encoder.block_params * FP32 + min(ds.prefetch_bucket, shape.encoder_params) * FP32
        return forward, target

    def communication(self, shape: ModelShape, world: int, shards: int, accum: int, bf16: bool) -> Communication:
        psi, p_all, pe = shape.trainable_params, shape.params, shape.encoder_params
        w = BF16 if bf16 else FP32
        g = FP32 if self.settings(bf16).fp32_reduction else w  # bytes per reduced gradient element
        # ZeRO-1/2 bf16: the EMA all-reduces the encoder's fp32 master weights every step.
        ema = 2 * ring(shape.encoder_trainable * FP32, world) if bf16 and self.stage < 3 else 0.0
        if self.stage == 1:
            # The fp32 accumulation buffer is reduced once per step, in the communication dtype:
            # all-reduced by DeepSpeed's BF16_Optimizer, reduce-scattered by the ZeRO optimizer (fp32).
            grads = (0.0, 2 * ring(psi * g, world)) if bf16 else (ring(psi * FP32, world), 0.0)
            return Communication(ring(p_all * w, world), grads[0], grads[1] + ema)
        # From stage 2 every micro-step's gradients are reduced into the partitions: ZeRO-2 all-reduces
        # each bucket (DSSettings.bucket_allreduce; counted by `pijepa bench collectives`), ZeRO-3
        # reduce-scatters it.
        reduce = accum * ring(psi * g, world)
        settings = self.settings(bf16)
        if self.stage == 2:
            grads = (0.0, 2 * reduce) if settings.bucket_allreduce else (reduce, 0.0)
            # + the updated parameters gathered after the step
            return Communication(ring(p_all * w, world), grads[0], grads[1] + ema)
        # Stage 3: encoder + predictor gathered for forward and, unless kept, again for backward,
        # the fp32 target engine gathered for its forward, every micro-step; the EMA works on
        # partitions (no traffic).
        gathers = 1 if settings.keeps_gathered(p_all) else 2
        return Communication(accum * (gathers * ring(p_all * w, world) + ring(pe * FP32, world)), reduce, 0.0)


def json_stage(deepspeed_config: str) -> int:
    """zero_optimization.stage of dist.deepspeed_config, found as pijepa.parallel.deepspeed finds it:
    as given (absolute, or relative to the working directory), else the packaged JSON of that name."""
    try:
        path = resolve_packaged(Path(deepspeed_config).expanduser(), kind="deepspeed")
    except ConfigError as e:
        raise ConfigError(f"dist.deepspeed_config: DeepSpeed config file not found: {e}") from None
    return int(read_ds_json(path).get("zero_optimization", {}).get("stage", DEFAULT_STAGE))


def configured(dist: DistConfig, gpus: int) -> tuple[str, int]:
    """(cost model, shard ranks) of `dist.strategy: deepspeed`: dist.zero_stage, else the JSON's
    stage (a stage 0 as ZeRO-1)."""
    stage = dist.zero_stage if dist.zero_stage >= 0 else json_stage(dist.deepspeed_config)
    return f"zero{max(1, stage)}", gpus
