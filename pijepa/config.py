"""Typed run configuration: dataclasses loaded from YAML, `--set a.b=c` overrides, validation, dump.

Section and key names follow the I-JEPA configs (`meta`, `data`, `mask`, `optimization`, `logging`)
so that an existing I-JEPA YAML loads with at most its data paths changed. Keys that I-JEPA has but
that mean nothing here (`copy_data`, `pin_mem`, ...) are accepted and documented as such.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pijepa.data import DATASETS, DatasetName
from pijepa.data.wds import MODES as WDS_MODES
from pijepa.data.wds import WdsMode
from pijepa.losses.pkt import GROUPINGS as PKT_GROUPINGS
from pijepa.losses.pkt import PktGrouping
from pijepa.losses.registry import LOSS_NAMES, LossName
from pijepa.masks.multiblock import PLACEMENTS as MASK_PLACEMENTS
from pijepa.masks.multiblock import MaskPlacement
from pijepa.models.attention import ATTN_BACKENDS, AttnBackend
from pijepa.models.vit import MODEL_NAMES, ModelName
from pijepa.parallel.options import AC_MODES, FSDP_SHARDINGS, STRATEGIES, DistConfig
from pijepa.runtime.atomic import atomic_write_text
from pijepa.runtime.errors import ConfigError
from pijepa.runtime.resources import resolve_packaged


@dataclass
class MetaConfig:
    model_name: ModelName = "vit_tiny"
    encoder_depth: int = 0  # blocks of the encoder; 0 keeps model_name's standard depth
    pred_depth: int = 6
    pred_emb_dim: int = 384
    use_bfloat16: bool = False  # bf16 autocast where the device supports it; CPU default is fp32
    attn_backend: AttnBackend = "sdpa"
    seed: int = 0
    load_checkpoint: bool = False  # start from read_checkpoint (weights only) on a fresh run
    read_checkpoint: str | None = None
    copy_data: bool = False  # I-JEPA key, unused: data is streamed, never copied


@dataclass
class DataConfig:
    dataset: DatasetName = "synthetic"
    root_path: str = ""
    image_folder: str = ""  # folder dataset: root_path/image_folder is an ImageFolder tree
    # webdataset: brace patterns, index files/folders (shards.json) or pipe: commands, separated by
    # commas (outside braces) or "::"; a YAML list is joined with commas
    shards: str = ""
    wds_mode: WdsMode = "resampled"  # resampled (shards drawn with replacement) | finite (each sample once an epoch)
    shuffle_buffer: int = 1000  # samples per reader in webdataset's shuffle buffer; 0 or 1 disables it
    epoch_samples: int = 0  # samples per epoch; 0 takes the total of shards.json (needed without one)
    batch_size: int = 32  # per rank and micro-step
    global_batch_size: int = 0  # effective batch; 0 means batch_size x world size (no accumulation)
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    use_horizontal_flip: bool = False
    use_color_distortion: bool = False
    color_jitter_strength: float = 0.0
    use_gaussian_blur: bool = False
    num_workers: int = 2
    pin_mem: bool = True
    synthetic_images: int = 8192  # size of one epoch of the built-in synthetic dataset
    synthetic_classes: int = 10


@dataclass
class MaskConfig:
    patch_size: int = 16
    allow_overlap: bool = False
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    min_keep: int = 10
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    placement: MaskPlacement = "full"  # full | original (I-JEPA's, never reaches the last row/column)


@dataclass
class OptimizationConfig:
    ema: tuple[float, float] = (0.996, 1.0)
    epochs: int = 300
    final_lr: float = 1.0e-6
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    lr: float = 1.0e-3
    start_lr: float = 2.0e-4
    warmup: float = 40  # epochs of linear warm-up
    weight_decay: float = 0.04
    loss_function: LossName = "L2_PKT"
    l2_weight: float = 1.0
    pkt_weight: float = 1.0
    pkt_grouping: PktGrouping = "chunk"
    pkt_chunk_size: int = 256
    fused_loss: bool = True
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    max_steps: int = 0  # stop early after this many optimizer steps; 0 runs all epochs
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with non-finite loss/grads


@dataclass
class LoggingConfig:
    folder: str = "runs/default"
    write_tag: str = "jepa"
    log_freq: int = 10  # optimizer steps between console/TensorBoard/CSV lines
    checkpoint_freq: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest K step checkpoints kept
    tensorboard: bool = True
    mask_viz_freq: int = 500  # optimizer steps between mask-grid images in TensorBoard; 0 disables


@dataclass
class Config:
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples become lists so that the YAML dump is plain and loads back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads YAML (or defaults when `path` is None), applies `a.b=c` overrides, validates."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_packaged(path, kind="config")  # a file, or a packaged name: cpu_default
        source = str(path)
        raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    _join_shard_list(raw, source)
    cfg = _build(Config, raw, source, prefix="")
    validate(cfg, source)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:  # one line: where it broke and why
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: does not parse as YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. data.batch_size=64")
    section, name = parts
    value = yaml.safe_load(text) if text.strip() else None
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: section {section!r} is not a mapping in the config")
    node[name] = value


def _join_shard_list(raw: dict[str, Any], source: str) -> None:
    """data.shards may be a YAML list of specs; it is kept as one comma-separated string."""
    data = raw.get("data")
    shards = data.get("shards") if isinstance(data, dict) else None
    if isinstance(shards, list):
        if not all(isinstance(s, str) and s.strip() for s in shards):
            raise ConfigError(f"{source}: data.shards = {shards!r}: expected shard specs (strings)")
        data["shards"] = ",".join(s.strip() for s in shards)


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; allowed keys in {where}: "
            + ", ".join(sorted(names))
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, source, f"{name}.")
        else:
            kwargs[name] = _coerce(value, hint, source, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, source, key)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: {key} = {value!r} is not allowed; expected one of " + ", ".join(args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a list of {len(args)} numbers")
        return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise ConfigError(f"{source}: {key} = {value!r}: expected {hint.__name__}, got {type(value).__name__}")


# ---------------------------------------------------------------- validation


def validate(cfg: Config, source: str = "<config>") -> None:
    """Refuses values that cannot run, naming the key and what is allowed."""

    def fail(key: str, value: Any, allowed: str) -> None:
        raise ConfigError(f"{source}: {key} = {value!r} is not allowed; expected {allowed}")

    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            fail(key, value, "one of " + ", ".join(options))

    def positive(key: str, value: float) -> None:
        if value <= 0:
            fail(key, value, "a positive number")

    def unit_range(key: str, lo_hi: tuple[float, float], low: float = 0.0, high: float = 1.0) -> None:
        lo, hi = lo_hi
        if not (low <= lo <= hi <= high):
            fail(key, list(lo_hi), f"[lo, hi] with {low} <= lo <= hi <= {high}")

    m, d, k, o, lg = cfg.meta, cfg.data, cfg.mask, cfg.optimization, cfg.logging
    choice("meta.model_name", m.model_name, MODEL_NAMES)
    choice("meta.attn_backend", m.attn_backend, ATTN_BACKENDS)
    positive("meta.pred_depth", m.pred_depth)
    if m.encoder_depth < 0:
        fail("meta.encoder_depth", m.encoder_depth, f"0 ({m.model_name}'s standard depth) or a number of blocks")
    positive("meta.pred_emb_dim", m.pred_emb_dim)
    if m.load_checkpoint and not m.read_checkpoint:
        fail("meta.read_checkpoint", m.read_checkpoint, "a checkpoint path when meta.load_checkpoint is true")
    choice("data.dataset", d.dataset, DATASETS)
    positive("data.batch_size", d.batch_size)
    positive("data.crop_size", d.crop_size)
    unit_range("data.crop_scale", d.crop_scale)
    if d.crop_scale[0] <= 0:
        fail("data.crop_scale", list(d.crop_scale), "a lower bound above 0")
    if d.global_batch_size < 0:
        fail("data.global_batch_size", d.global_batch_size, "0 (= batch_size x ranks) or a positive multiple")
    if d.global_batch_size and d.global_batch_size % d.batch_size:
        fail("data.global_batch_size", d.global_batch_size, f"a multiple of data.batch_size ({d.batch_size})")
    if d.num_workers < 0:
        fail("data.num_workers", d.num_workers, "0 or more")
    if d.dataset == "folder" and not (d.root_path or d.image_folder):
        fail("data.image_folder", d.image_folder, "a path (root_path/image_folder) for data.dataset: folder")
    if d.dataset == "webdataset" and not d.shards:
        fail("data.shards", d.shards, "a shard pattern or index file for data.dataset: webdataset")
    choice("data.wds_mode", d.wds_mode, WDS_MODES)
    if d.shuffle_buffer < 0:
        fail("data.shuffle_buffer", d.shuffle_buffer, "0 (no shuffle buffer) or more samples")
    if d.epoch_samples < 0:
        fail("data.epoch_samples", d.epoch_samples, "0 (the total of shards.json) or a positive number of samples")
    positive("data.synthetic_images", d.synthetic_images)
    if d.synthetic_classes < 2:
        fail("data.synthetic_classes", d.synthetic_classes, "2 or more")
    positive("mask.patch_size", k.patch_size)
    if d.crop_size % k.patch_size:
        fail("data.crop_size", d.crop_size, f"a multiple of mask.patch_size ({k.patch_size})")
    grid = d.crop_size // k.patch_size
    if not 1 <= k.min_keep <= grid * grid:
        fail("mask.min_keep", k.min_keep, f"1..{grid * grid}, the patches of the {grid}x{grid} grid "
             f"(data.crop_size {d.crop_size} / mask.patch_size {k.patch_size})")
    unit_range("mask.enc_mask_scale", k.enc_mask_scale)
    unit_range("mask.pred_mask_scale", k.pred_mask_scale)
    unit_range("mask.aspect_ratio", k.aspect_ratio, low=1e-3, high=1e3)
    if k.num_enc_masks != 1:
        fail("mask.num_enc_masks", k.num_enc_masks, "1 (every published I-JEPA recipe uses one context block)")
    positive("mask.num_pred_masks", k.num_pred_masks)
    choice("mask.placement", k.placement, MASK_PLACEMENTS)
    unit_range("optimization.ema", o.ema)
    positive("optimization.epochs", o.epochs)
    positive("optimization.ipe_scale", o.ipe_scale)
    for key in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "warmup",
                "l2_weight", "pkt_weight", "clip_grad", "max_steps"):
        if getattr(o, key) < 0:
            fail(f"optimization.{key}", getattr(o, key), "0 or more")
    if o.warmup > o.epochs:
        fail("optimization.warmup", o.warmup, f"at most optimization.epochs ({o.epochs})")
    positive("optimization.max_nonfinite_steps", o.max_nonfinite_steps)
    choice("optimization.loss_function", o.loss_function, LOSS_NAMES)
    choice("optimization.pkt_grouping", o.pkt_grouping, PKT_GROUPINGS)
    if o.loss_function == "L2_PKT_chunks" and o.pkt_grouping != "chunk":
        fail("optimization.pkt_grouping", o.pkt_grouping, "chunk with loss_function L2_PKT_chunks")
    if o.pkt_chunk_size < 2:
        fail("optimization.pkt_chunk_size", o.pkt_chunk_size, "2 or more rows")
    positive("logging.log_freq", lg.log_freq)
    positive("logging.checkpoint_freq", lg.checkpoint_freq)
    positive("logging.keep_checkpoints", lg.keep_checkpoints)
    if lg.mask_viz_freq < 0:
        fail("logging.mask_viz_freq", lg.mask_viz_freq, "0 (off) or a number of optimizer steps")
    t = cfg.dist
    choice("dist.strategy", t.strategy, STRATEGIES)
    choice("dist.fsdp_sharding", t.fsdp_sharding, FSDP_SHARDINGS)
    choice("dist.activation_checkpointing", t.activation_checkpointing, AC_MODES)
    positive("dist.ac_every", t.ac_every)
    if t.hybrid_shard_size < 0:
        fail("dist.hybrid_shard_size", t.hybrid_shard_size,
             "0 (ranks per node) or a positive divisor of the world size")
    if t.zero_stage not in (-1, 0, 1, 2, 3):
        fail("dist.zero_stage", t.zero_stage, "-1 (use the JSON's stage), 0, 1, 2 or 3")


def dump_config(cfg: Config, path: Path) -> None:
    """Writes the resolved config; loading it back gives the same Config."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
