"""The DeepSpeed JSON (dist.deepspeed_config): found, read, checked against pijepa's config and
completed into the config handed to deepspeed.initialize.

The JSON holds the ZeRO settings; the keys that pijepa's config already decides are derived from it:
the batch keys from data.batch_size and data.global_batch_size, gradient_clipping from
optimization.clip_grad, bf16.enabled from meta.use_bfloat16 (the one source of truth for precision).
A JSON value for a derived key must be "auto", absent or equal: a disagreement would silently change
the effective batch or the clipping. Gradients are reduced in fp32 (`communication_data_type`), as
under FSDP, unless the JSON asks for bf16 (a note says so). See ds_configs/README.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pijepa.runtime.errors import ConfigError
from pijepa.runtime.resources import resolve_packaged

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def resolve_ds_config_path(path: str) -> Path:
    """dist.deepspeed_config as given (absolute, or relative to the working directory), else the
    packaged JSON of that name (so the default `ds_configs/...` works from any directory and from
    an installed wheel)."""
    try:
        return resolve_packaged(Path(path).expanduser(), kind="deepspeed")
    except ConfigError as e:
        raise ConfigError(f"dist.deepspeed_config: DeepSpeed config file not found: {e}") from None


def read_ds_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read DeepSpeed config ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def build_ds_config(raw: dict[str, Any], source: str, *, micro_batch: int, accum: int, world: int,
                    clip_grad: float, bf16: bool, zero_stage: int) -> tuple[dict[str, Any], list[str]]:
    """The config handed to deepspeed.initialize, and warnings to print once.

    Keys pijepa decides are written from its config; a JSON value for them must be "auto", absent
    or equal (a disagreement would silently change the effective batch or the clipping)."""
    ds = copy.deepcopy(raw)
    _set_batch_keys(ds, source, micro_batch, accum, world)
    _set_clipping(ds, source, clip_grad)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{source}: remove the \"{section}\" section: pijepa builds AdamW and its "
                              f"lr / weight-decay schedules from optimization.*")
    notes = _set_precision(ds, source, bf16) + _set_communication_dtype(ds, source)
    _set_zero_stage(ds, source, zero_stage)
    ds.setdefault("steps_per_print", 10**9)  # pijepa logs; DeepSpeed's own progress lines are noise
    ds.setdefault("wall_clock_breakdown", False)
    return ds, notes


def _set_batch_keys(ds: dict[str, Any], source: str, micro_batch: int, accum: int, world: int) -> None:
    ours = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum,
            "train_batch_size": micro_batch * accum * world}
    why = {"train_micro_batch_size_per_gpu": "data.batch_size",
           "gradient_accumulation_steps": "data.global_batch_size / (data.batch_size x ranks)",
           "train_batch_size": f"data.batch_size {micro_batch} x accumulation {accum} x {world} ranks"}
    for key in BATCH_KEYS:
        given = ds.get(key, "auto")
        if given != "auto" and (isinstance(given, bool) or given != ours[key]):
            raise ConfigError(
                f"{source}: {key} = {given!r} disagrees with this run's {ours[key]} ({why[key]}); "
                f"set it to \"auto\" or remove it: pijepa derives DeepSpeed's batch keys from "
                f"data.batch_size and data.global_batch_size")
        ds[key] = ours[key]


def _set_clipping(ds: dict[str, Any], source: str, clip_grad: float) -> None:
    given = ds.get("gradient_clipping", "auto")
    if given != "auto" and (not isinstance(given, (int, float)) or float(given) != clip_grad):
        raise ConfigError(f"{source}: gradient_clipping = {given!r} disagrees with optimization.clip_grad "
                          f"= {clip_grad}; set it to \"auto\" or remove it")
    ds["gradient_clipping"] = clip_grad


def _set_precision(ds: dict[str, Any], source: str, bf16: bool) -> list[str]:
    """bf16.enabled from meta.use_bfloat16; fp16 is refused. Returns the notes to warn with."""
    fp16 = ds.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{source}: fp16.enabled = {fp16.get('enabled')!r} is not supported; "
                          f"pijepa trains in bf16 (meta.use_bfloat16: true) or fp32")
    ds.pop("fp16", None)
    notes = []
    section: dict[str, Any] = ds["bf16"] if isinstance(ds.get("bf16"), dict) else {}
    given = section.get("enabled", "auto")
    if given != "auto" and given != bf16:
        notes.append(f"{source}: bf16.enabled = {json.dumps(given)} is overridden by meta.use_bfloat16 = "
                     f"{str(bf16).lower()} (the one source of truth for precision): training in "
                     f"{'bf16' if bf16 else 'fp32'}")
    ds["bf16"] = {**section, "enabled": bf16}
    if bf16:  # gradients accumulate over micro-steps in fp32 unless the JSON says otherwise
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return notes


def _set_communication_dtype(ds: dict[str, Any], source: str) -> list[str]:
    """communication_data_type: fp32 unless the JSON says bf16. DeepSpeed's default under bf16 is
    bf16, which rounds every gradient to 8 significant bits before summing over the ranks (and
    the sum itself in bf16); FSDP reduces in fp32 (MixedPrecisionPolicy reduce_dtype). fp16 is
    refused like fp16 training."""
    given = ds.get("communication_data_type", "fp32")
    given = given.lower() if isinstance(given, str) else given  # DeepSpeed reads it case-blind
    if given not in ("fp32", "bf16"):
        raise ConfigError(f"{source}: communication_data_type = {json.dumps(given)} is not supported; "
                          f"expected \"fp32\" (the default: gradients reduced in fp32, as under FSDP) or \"bf16\"")
    ds["communication_data_type"] = given
    if given == "bf16":
        return [f"{source}: communication_data_type = \"bf16\": gradients are reduced in bf16 (half the "
                f"traffic of fp32, but rounded to 8 significant bits before the sum over ranks)"]
    return []


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """Whether zero_optimization.offload_optimizer moves the optimizer step off the accelerator."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device", "none") in ("cpu", "nvme")


def _set_zero_stage(ds: dict[str, Any], source: str, zero_stage: int) -> None:
    given = ds.get("zero_optimization", {})
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: zero_optimization = {given!r}: expected a JSON object")
    zero = dict(given)
    if zero_stage >= 0:
        zero["stage"] = zero_stage
    if zero.get("stage", 0) not in (1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage = {zero.get('stage', 0)!r} is not supported; "
                          f"expected 1, 2 or 3 (set dist.zero_stage to override; without ZeRO use "
                          f"dist.strategy: ddp)")
    ds["zero_optimization"] = zero


def target_ds_config(ds: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3 config of the EMA target's engine: fp32, no optimizer, every parameter partitioned
    (a persistent, unpartitioned parameter would keep a full copy that partition updates miss)."""
    zero = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
    zero["stage3_param_persistence_threshold"] = 0
    return {**{k: ds[k] for k in BATCH_KEYS}, "zero_optimization": zero, "bf16": {"enabled": False},
            "steps_per_print": ds["steps_per_print"], "wall_clock_breakdown": False}
