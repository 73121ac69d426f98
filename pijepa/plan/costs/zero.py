"""DeepSpeed ZeRO-1/2/3 (pijepa/parallel/deepspeed.py, ds_configs/), `dist.strategy: deepspeed`;
the rows of the state table are in pijepa/plan/costs/__init__.py.

- DeepSpeed bf16: the engine holds bf16 module weights; the ZeRO optimizer holds fp32 master
  weights and AdamW m, v (the ZeRO paper's K = 12 bytes per parameter), partitioned over N; pijepa
  sets `data_types.grad_accum_dtype: fp32`, so gradients accumulate in fp32: in a full buffer at
  ZeRO-1 (DeepSpeed's BF16_Optimizer), in the rank's partition from ZeRO-2. Buffers, from the
  packaged ds_configs/zero{1,2,3}_{bf16,fp32}.json (DeepSpeed's defaults where a key is absent):
  ZeRO-2/3 pass each micro-step's bf16 gradients through the reduce bucket (two with
  overlap_comm); ZeRO-1 all-reduces its fp32 buffer in buckets of that size at the step; ZeRO-1/2
  all-gather the updated bf16 weights through the all-gather bucket; ZeRO-3 holds two gathered
  blocks plus the prefetch bucket. Buckets are capped at the model's size. The bf16 gradients that
  autograd produces before they reach the fp32 buffers are not counted (they live per bucket).
- EMA target under DeepSpeed: outside the engine, fp32. ZeRO-1/2: replicated (4Pe on every rank),
  moved towards the engine's weights. ZeRO-3: partitioned by a second, optimizer-less ZeRO-3 engine
  (4Pe/N), whose forward gathers fp32 blocks (counted as transient and as communication).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from pijepa.parallel.options import DistConfig
from pijepa.plan.costs.base import Communication, CostModel, State, adam_temporaries, ring
from pijepa.plan.precision import BF16, FP32
from pijepa.plan.shapes import ModelShape
from pijepa.runtime.errors import ConfigError
from pijepa.runtime.resources import resolve_packaged

DEFAULT_STAGE = 2  # DeepSpeed JSON without zero_optimization.stage, as pijepa.parallel.deepspeed reads it


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read DeepSpeed config ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


@dataclass(frozen=True)
class DSSettings:
    """The DeepSpeed JSON's buffer settings that cost memory (elements; DeepSpeed's defaults)."""

    reduce_bucket: float = 5e8
    allgather_bucket: float = 5e8
    prefetch_bucket: float = 5e7
    overlap_comm: bool = False

    @classmethod
    def from_json(cls, path: Path) -> DSSettings:
        zero = read_json(path).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        return cls(float(zero.get("reduce_bucket_size", cls.reduce_bucket)),
                   float(zero.get("allgather_bucket_size", cls.allgather_bucket)),
                   float(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket)),
                   bool(zero.get("overlap_comm", stage == 3)))  # DeepSpeed turns it on for stage 3

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
        # overlap_comm); ZeRO-1 all-reduces the fp32 buffer in buckets of the same size at the step.
        ipg = min(ds.reduce_bucket, psi) * w * (2 if ds.overlap_comm else 1)
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
            step_transient=adam_temporaries(shape, psi / n, device) + step_buffers)

    def _gathered_weights(self, shape: ModelShape, ds: DSSettings, w: int, bf16: bool) -> tuple[float, float]:
        """(weights alive from forward through backward, weights alive in the target's forward)."""
        if self.stage < 3:
            return 0.0, (shape.encoder.block_params * BF16 if bf16 else 0.0)  # autocast's per-op casts
        # Layer by layer gathers: the running and the next block plus the prefetch bucket; the EMA
        # target is a second ZeRO-3 engine (fp32, partitioned): its forward gathers in fp32.
        block = max(shape.encoder.block_params, shape.predictor.block_params)
        forward = 2 * block * w + min(ds.prefetch_bucket, shape.params) * w
        target = 2 * shape.encoder.block_params * FP32 + min(ds.prefetch_bucket, shape.encoder_params) * FP32
        return forward, target

    def communication(self, shape: ModelShape, world: int, shards: int, accum: int, bf16: bool) -> Communication:
        psi, p_all, pe = shape.trainable_params, shape.params, shape.encoder_params
        w = BF16 if bf16 else FP32
        if self.stage == 1:
            # The fp32 accumulation buffer is reduced once per step: all-reduced by DeepSpeed's
            # BF16_Optimizer (bf16), reduce-scattered by the ZeRO optimizer (fp32).
            grads = (0.0, 2 * ring(psi * FP32, world)) if bf16 else (ring(psi * FP32, world), 0.0)
            return Communication(ring(p_all * w, world), *grads)
        # From stage 2 every micro-step's bf16 gradients are reduce-scattered into the partitions.
        reduce = accum * ring(psi * w, world)
        if self.stage == 2:
            return Communication(ring(p_all * w, world), reduce, 0.0)  # + updated parameters after the step
        # Stage 3: encoder + predictor gathered for forward and again for backward, the fp32 target
        # engine gathered for its forward, every micro-step; the EMA works on partitions (no traffic).
        return Communication(accum * (2 * ring(p_all * w, world) + ring(pe * FP32, world)), reduce, 0.0)


def json_stage(deepspeed_config: str) -> int:
    """zero_optimization.stage of dist.deepspeed_config, found as pijepa.parallel.deepspeed finds it:
    as given (absolute, or relative to the working directory), else the packaged JSON of that name."""
    try:
        path = resolve_packaged(Path(deepspeed_config).expanduser(), kind="deepspeed")
    except ConfigError as e:
        raise ConfigError(f"dist.deepspeed_config: DeepSpeed config file not found: {e}") from None
    return int(read_json(path).get("zero_optimization", {}).get("stage", DEFAULT_STAGE))


def configured(dist: DistConfig, gpus: int) -> tuple[str, int]:
    """(cost model, shard ranks) of `dist.strategy: deepspeed`: dist.zero_stage, else the JSON's
    stage (a stage 0 as ZeRO-1)."""
    stage = dist.zero_stage if dist.zero_stage >= 0 else json_stage(dist.deepspeed_config)
    return f"zero{max(1, stage)}", gpus
