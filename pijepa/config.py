"""Typed run configuration: dataclasses loaded from YAML, `--set a.b=c` overrides, validation, dump.

Section and key names follow the I-JEPA configs (`meta`, `data`, `mask`, `optimization`, `logging`)
so that an existing I-JEPA YAML loads with at most its data paths changed. Keys that I-JEPA has but
that mean nothing here (`copy_data`, `pin_mem`, ...) are accepted and documented as such.

Each field is declared once, with what it accepts: a choice is a `Literal` type owned by the module
that implements it (ModelName in pijepa.models.vit, ...), a number carries its bounds (`bounded`,
`span` from pijepa.runtime.schema). Both are checked while each section is built from YAML; `validate`
adds the checks that read several fields. A refusal is one line, `<source>: <key> = <value> ...`,
whose source is the YAML file, or `--set` for a key given on the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from pijepa.data import DatasetName
from pijepa.data.wds import WdsMode
from pijepa.losses.pkt import PktGrouping
from pijepa.losses.registry import LossName
from pijepa.masks.multiblock import MaskPlacement
from pijepa.models.attention import AttnBackend
from pijepa.models.vit import ModelName, WeightInit
from pijepa.parallel.options import DistConfig
from pijepa.runtime.atomic import atomic_write_text
from pijepa.runtime.errors import ConfigError
from pijepa.runtime.resources import resolve_packaged
from pijepa.runtime.schema import bounded, check_fields, coerce, not_allowed, span


@dataclass
class MetaConfig:
    model_name: ModelName = "vit_tiny"  # encoder size: its width, heads and standard depth
    # blocks of the encoder; 0 keeps model_name's standard depth
    encoder_depth: int = bounded(0, min=0, expected="0 ({model_name}'s standard depth) or a number of blocks")
    pred_depth: int = bounded(6, min=1)  # predictor blocks
    pred_emb_dim: int = bounded(384, min=1)  # predictor width
    use_bfloat16: bool = False  # bf16 autocast where the device supports it; CPU default is fp32
    attn_backend: AttnBackend = "sdpa"
    # reference: every Linear trunc_normal(0.02), zero bias, LayerNorm (1, 0), as I-JEPA's training
    # script leaves its models; depth_scaled: also divide block i's attn.proj and mlp.fc2 by
    # sqrt(2 i), as I-JEPA's model constructors do before the training script re-draws them
    weight_init: WeightInit = "reference"
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
    # samples per reader in webdataset's shuffle buffer; 0 or 1 disables it
    shuffle_buffer: int = bounded(1000, min=0, expected="0 (no shuffle buffer) or more samples")
    # samples per epoch; 0 takes the total of shards.json (needed without one)
    epoch_samples: int = bounded(
        0, min=0, expected="0 (the total of shards.json) or a positive number of samples")
    # per rank and micro-step; auto: the largest the planner fits in the device's free memory (or in
    # memory_budget_gib), accumulation derived from global_batch_size (pijepa.train.auto_batch)
    batch_size: int | Literal["auto"] = bounded(32, min=1)
    memory_budget_gib: float = bounded(0.0, min=0, expected="0 (the device's free memory) or GiB per rank")
    # effective batch; 0 means batch_size x world size (no accumulation); a multiple of batch_size
    global_batch_size: int = bounded(0, min=0, expected="0 (= batch_size x ranks) or a positive multiple")
    crop_size: int = bounded(224, min=1)  # pixels; a multiple of mask.patch_size
    crop_scale: tuple[float, float] = span((0.3, 1.0), lo_above=0)  # RandomResizedCrop area range
    use_horizontal_flip: bool = False
    use_color_distortion: bool = False
    color_jitter_strength: float = 0.0
    use_gaussian_blur: bool = False
    num_workers: int = bounded(2, min=0)  # DataLoader workers per rank; 0 loads in the main process
    pin_mem: bool = True
    synthetic_images: int = bounded(8192, min=1)  # size of one epoch of the built-in synthetic dataset
    synthetic_classes: int = bounded(10, min=2)

    @property
    def micro_batch(self) -> int:
        """batch_size as a number: `auto` is resolved when a run starts (pijepa.train.auto_batch)."""
        if self.batch_size == "auto":
            raise ConfigError("data.batch_size is auto: it is resolved when training starts; give a number here")
        return self.batch_size


@dataclass
class MaskConfig:
    patch_size: int = bounded(16, min=1)  # pixels per side of a patch (token)
    allow_overlap: bool = False  # context block may overlap the target blocks
    aspect_ratio: tuple[float, float] = span((0.75, 1.5), low=1e-3, high=1e3)  # of the target blocks
    enc_mask_scale: tuple[float, float] = span((0.85, 1.0))  # context block, fraction of the image
    pred_mask_scale: tuple[float, float] = span((0.15, 0.2))  # each target block, fraction of the image
    min_keep: int = 10  # fewest patches the context mask keeps; 1..patches of the grid
    num_enc_masks: int = bounded(
        1, min=1, max=1, expected="1 (every published I-JEPA recipe uses one context block)")
    num_pred_masks: int = bounded(4, min=1)  # target blocks per image
    placement: MaskPlacement = "full"  # full | original (I-JEPA's, never reaches the last row/column)


@dataclass
class OptimizationConfig:
    ema: tuple[float, float] = span((0.996, 1.0))  # target-encoder momentum, start and end
    epochs: int = bounded(300, min=1)
    final_lr: float = bounded(1.0e-6, min=0)
    final_weight_decay: float = bounded(0.4, min=0)
    ipe_scale: float = bounded(1.0, above=0)  # stretches the schedules: ipe_scale x epochs x steps/epoch
    lr: float = bounded(1.0e-3, min=0)  # peak, reached at the end of warm-up
    start_lr: float = bounded(2.0e-4, min=0)
    warmup: float = bounded(40, min=0)  # epochs of linear warm-up; at most epochs
    weight_decay: float = bounded(0.04, min=0)
    loss_function: LossName = "L2_PKT"
    l2_weight: float = bounded(1.0, min=0)
    pkt_weight: float = bounded(1.0, min=0)
    pkt_grouping: PktGrouping = "chunk"  # chunk is required by loss_function L2_PKT_chunks
    pkt_chunk_size: int = bounded(256, min=2, expected="2 or more rows")
    # fused gather + LayerNorm + L2 + PKT (equal to the plain path); auto: fused on a GPU, and on
    # the CPU only for image grouping, where it wins (`pijepa bench loss`: 0.79x for chunk and
    # block grouping on CPU, 21.6x for image; 25-127x on an H200)
    fused_loss: bool | Literal["auto"] = "auto"
    clip_grad: float = bounded(0.0, min=0)  # max gradient norm; 0 disables clipping
    max_steps: int = bounded(0, min=0)  # stop early after this many optimizer steps; 0 runs all epochs
    # stop after this many steps in a row with non-finite loss/grads
    max_nonfinite_steps: int = bounded(10, min=1)


@dataclass
class LoggingConfig:
    folder: str = "runs/default"
    write_tag: str = "jepa"
    log_freq: int = bounded(10, min=1)  # optimizer steps between console/TensorBoard/CSV lines
    # optimizer steps between the checks that read the device or ask every rank (preemption signal,
    # skipped non-finite steps); also at every log and checkpoint step. Keep check_freq x step time
    # well inside the preemption grace period (e.g. 10 x 2 s against SLURM's --signal=...@120).
    check_freq: int = bounded(10, min=1)
    checkpoint_freq: int = bounded(500, min=1)  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = bounded(2, min=1)  # newest K step checkpoints kept
    tensorboard: bool = True
    # optimizer steps between mask-grid images in TensorBoard; 0 disables
    mask_viz_freq: int = bounded(500, min=0, expected="0 (off) or a number of optimizer steps")


@dataclass
class Config:
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)  # owned by pijepa.parallel.options

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples become lists so that the YAML dump is plain and loads back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class _Origin:
    """Where the values came from: the YAML file (or <defaults>) and the keys given by --set."""

    file: str
    sets: dict[str, str] = field(default_factory=dict)  # "data.batch_size" -> "data.batch_size=abc"

    def of(self, key: str) -> str:
        """The source of one key's value (or of a section's key, for an unknown key or section)."""
        from_set = key in self.sets or any(k.startswith(key + ".") for k in self.sets)
        return "--set" if from_set else self.file

    def of_all(self, keys: tuple[str, ...]) -> str:
        """The source of a combination of keys: the file, and the --set items among them."""
        items = [self.sets[k] for k in keys if k in self.sets]
        return f"{self.file} with --set {', '.join(items)}" if items else self.file


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Reads YAML (or defaults when `path` is None), applies `a.b=c` overrides, checks each field
    and then the combinations; a refusal names the file, or `--set` for a key given there."""
    source = "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_packaged(path, kind="config")  # a file, or a packaged name: cpu_default
        source = str(path)
        raw = _read_yaml(path)
    origin = _Origin(source)
    for item in overrides:
        origin.sets[_apply_override(raw, item)] = item.strip()
    _join_shard_list(raw, origin)
    cfg = _build(Config, raw, origin, prefix="")
    _check_combinations(cfg, origin)
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


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Puts one `section.key=value` into `raw` (the value read as YAML); returns section.key."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. data.batch_size=64")
    section, name = parts
    value = yaml.safe_load(text) if text.strip() else None
    if raw.get(section) is None:  # absent, or an empty section in the YAML
        raw[section] = {}
    node = raw[section]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: section {section!r} is not a mapping in the config")
    node[name] = value
    return f"{section}.{name}"


def _join_shard_list(raw: dict[str, Any], origin: _Origin) -> None:
    """data.shards may be a YAML list of specs; it is kept as one comma-separated string."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    shards = data.get("shards")
    if isinstance(shards, list):
        if not all(isinstance(s, str) and s.strip() for s in shards):
            raise ConfigError(f"{origin.of('data.shards')}: data.shards = {shards!r}: expected shard specs (strings)")
        data["shards"] = ",".join(s.strip() for s in shards)


def _build(cls: type, raw: Any, origin: _Origin, prefix: str) -> Any:
    """One section (or the whole Config) from its mapping: keys known, values coerced to their
    types, then every field checked against its choices and bounds (defaults included)."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin.file}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"{origin.of(key)}: unknown key '{key}'; allowed keys in {where}: "
                          + ", ".join(sorted(names)))
    kwargs = {}
    for name in names:
        hint, key = hints[name], prefix + name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a section: built (and checked) even when absent
            value = raw.get(name)
            kwargs[name] = _build(hint, {} if value is None else value, origin, f"{key}.")
        elif name in raw:
            kwargs[name] = coerce(raw[name], hint, origin.of(key), key)
    section = cls(**kwargs)
    check_fields(section, origin.of, prefix)
    return section


# ---------------------------------------------------------------- validation


def validate(cfg: Config, source: str = "<config>") -> None:
    """Refuses a Config that cannot run, naming the key and what is allowed: each field against its
    choices and bounds, then the combinations of fields. load_config does both while loading; call
    this after changing a Config in code."""
    origin = _Origin(source)
    for f in dataclasses.fields(cfg):
        check_fields(getattr(cfg, f.name), origin.of, prefix=f"{f.name}.")
    _check_combinations(cfg, origin)


class _Problem(NamedTuple):
    """A refused combination: `key = value` is not allowed, `expected` says what is; `reads` are
    the other keys the rule depends on (a --set among them is named in the message)."""

    key: str
    value: Any
    expected: str
    reads: tuple[str, ...] = ()


def _check_combinations(cfg: Config, origin: _Origin) -> None:
    """The checks that read several fields (each field is already within its own bounds)."""
    for rule in (_run_problems, _data_problems, _grid_problems):
        for problem in rule(cfg):
            keys = (problem.key, *problem.reads)
            raise not_allowed(origin.of_all(keys), problem.key, problem.value, problem.expected)


def _run_problems(cfg: Config) -> Iterator[_Problem]:
    m, o = cfg.meta, cfg.optimization
    if m.load_checkpoint and not m.read_checkpoint:
        yield _Problem("meta.read_checkpoint", m.read_checkpoint,
                       "a checkpoint path when meta.load_checkpoint is true", ("meta.load_checkpoint",))
    if o.warmup > o.epochs:
        yield _Problem("optimization.warmup", o.warmup, f"at most optimization.epochs ({o.epochs})",
                       ("optimization.epochs",))
    if o.loss_function == "L2_PKT_chunks" and o.pkt_grouping != "chunk":
        yield _Problem("optimization.pkt_grouping", o.pkt_grouping, "chunk with loss_function L2_PKT_chunks",
                       ("optimization.loss_function",))


def _data_problems(cfg: Config) -> Iterator[_Problem]:
    d = cfg.data
    if d.batch_size == "auto" and not d.global_batch_size:
        yield _Problem("data.global_batch_size", 0, "a positive global batch when data.batch_size is auto",
                       ("data.batch_size",))
    if d.batch_size != "auto" and d.global_batch_size and d.global_batch_size % d.batch_size:
        yield _Problem("data.global_batch_size", d.global_batch_size,
                       f"a multiple of data.batch_size ({d.batch_size})", ("data.batch_size",))
    if d.dataset == "folder" and not (d.root_path or d.image_folder):
        yield _Problem("data.image_folder", d.image_folder,
                       "a path (root_path/image_folder) for data.dataset: folder",
                       ("data.dataset", "data.root_path"))
    if d.dataset == "webdataset" and not d.shards:
        yield _Problem("data.shards", d.shards, "a shard pattern or index file for data.dataset: webdataset",
                       ("data.dataset",))


def _grid_problems(cfg: Config) -> Iterator[_Problem]:
    d, k = cfg.data, cfg.mask
    if d.crop_size % k.patch_size:
        yield _Problem("data.crop_size", d.crop_size, f"a multiple of mask.patch_size ({k.patch_size})",
                       ("mask.patch_size",))
    grid = d.crop_size // k.patch_size
    if not 1 <= k.min_keep <= grid * grid:
        yield _Problem("mask.min_keep", k.min_keep,
                       f"1..{grid * grid}, the patches of the {grid}x{grid} grid "
                       f"(data.crop_size {d.crop_size} / mask.patch_size {k.patch_size})",
                       ("data.crop_size", "mask.patch_size"))


def dump_config(cfg: Config, path: Path) -> None:
    """Writes the resolved config; loading it back gives the same Config."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
