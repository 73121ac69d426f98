"""DeepSpeed ZeRO-1/2/3 behind the Strategy seam.

- One DeepSpeed engine steps the encoder and the predictor together: it wraps `OnlineModels`, a
  container whose forward is the trained part of a step (encoder, then predictor). The engine must
  see that forward as ONE call: its backward bookkeeping (ZeRO's backward prologue, the ZeRO-3
  prefetch trace reset) hangs off the engine's forward and the container's forward pre-hook, so
  calling the submodules directly would skip it. `DeepSpeedModels.predict` routes the trainer's
  `models.predict(...)` through the engine.
- The optimizer is a torch AdamW over pijepa's param groups, handed to `deepspeed.initialize`.
  DeepSpeed's ZeRO / bf16 wrappers keep the client optimizer's `param_groups` dicts (only their
  `params` are swapped for flat fp32 partitions), so the trainer's per-step lr / weight decay,
  written into `engine.optimizer.param_groups`, reach the optimizer that DeepSpeed steps.
- Accumulation: `engine.backward` scales by 1/GAS itself; `engine.step()` runs after every
  micro-step (DeepSpeed counts micro-steps and updates only on the boundary). The boundary
  `step()` is the one in `optimizer_step`, after the lr and weight decay are set. Gradient
  communication is DeepSpeed's: ZeRO-1 reduces once, at the boundary; ZeRO-2/3 reduce-scatter on
  every micro-step (the partitioned gradient buffers need it) and accumulate the partitions.
- EMA target: fp32, outside the engine (DeepSpeed's bf16 mode would cast anything inside it).
  ZeRO-1/2: a replicated fp32 module, moved towards the engine's module parameters (exactly the
  fp32 weights in fp32 runs; in bf16 runs the bf16 copies, upcast: each element of what the target
  moves towards is off by at most 2^-9 relative, the rounding the forward itself uses, while the
  small (1 - m) steps accumulate in fp32 and are never rounded away). ZeRO-3: the target is
  partitioned like the encoder, by a second ZeRO-3 engine without optimizer (fp32, every parameter
  partitioned), and each rank lerps its target partitions towards the optimizer's fp32 master
  partitions of the encoder: exact fp32, no communication, and the forward gathers it layer by
  layer like the encoder's.
- Checkpoints: DeepSpeed's own `save_checkpoint` into `<step folder>/ds/` (model + ZeRO optimizer
  partitions; every rank writes its part; paths are relative to the folder, so the Checkpointer's
  rename is safe; DeepSpeed also writes `latest` and `zero_to_fp32.py` there). Next to it:
  `ds_state.pt` (rank 0: format, world size, stage, the full fp32 EMA target and `extra`) and
  `rng_rank{r}.pt` (every rank's RNG states).
- The DeepSpeed JSON (dist.deepspeed_config) holds the ZeRO settings; the keys that pijepa's
  config already decides are derived from it: the batch keys from data.batch_size and
  data.global_batch_size, gradient_clipping from optimization.clip_grad, bf16.enabled from
  meta.use_bfloat16 (the one source of truth for precision). See ds_configs/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pijepa.parallel.base import JEPAModels, Strategy, ema_update_, param_groups, set_lr_wd
from pijepa.parallel.options import DistConfig, RunShape, accumulation_steps
from pijepa.parallel.single import pick_device
from pijepa.runtime.errors import ConfigError
from pijepa.runtime.log import console
from pijepa.runtime.resources import resolve_packaged

FORMAT = "pijepa-deepspeed-v1"
STATE_FILE = "ds_state.pt"  # its presence identifies the layout (see pijepa/parallel/formats.py)
TAG = "ds"  # DeepSpeed's checkpoint tag: the engine's files go to <step folder>/ds/
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---------------------------------------------------------------- the DeepSpeed JSON


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
    given = ds.get("gradient_clipping", "auto")
    if given != "auto" and (not isinstance(given, (int, float)) or float(given) != clip_grad):
        raise ConfigError(f"{source}: gradient_clipping = {given!r} disagrees with optimization.clip_grad "
                          f"= {clip_grad}; set it to \"auto\" or remove it")
    ds["gradient_clipping"] = clip_grad
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{source}: remove the \"{section}\" section: pijepa builds AdamW and its "
                              f"lr / weight-decay schedules from optimization.*")
    fp16 = ds.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{source}: fp16.enabled = {fp16.get('enabled')!r} is not supported; "
                          f"pijepa trains in bf16 (meta.use_bfloat16: true) or fp32")
    ds.pop("fp16", None)
    notes = []
    section = ds.get("bf16", {}) if isinstance(ds.get("bf16"), dict) else {}
    given = section.get("enabled", "auto")
    if given != "auto" and given != bf16:
        notes.append(f"{source}: bf16.enabled = {json.dumps(given)} is overridden by meta.use_bfloat16 = "
                        f"{str(bf16).lower()} (the one source of truth for precision): training in "
                        f"{'bf16' if bf16 else 'fp32'}")
    ds["bf16"] = {**section, "enabled": bf16}
    if bf16:  # gradients accumulate over micro-steps in fp32 unless the JSON says otherwise
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    zero = dict(ds.get("zero_optimization", {}))
    if zero_stage >= 0:
        zero["stage"] = zero_stage
    if zero.get("stage", 0) not in (1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage = {zero.get('stage', 0)!r} is not supported; "
                          f"expected 1, 2 or 3 (set dist.zero_stage to override; without ZeRO use "
                          f"dist.strategy: ddp)")
    ds["zero_optimization"] = zero
    ds.setdefault("steps_per_print", 10**9)  # pijepa logs; DeepSpeed's own progress lines are noise
    ds.setdefault("wall_clock_breakdown", False)
    return ds, notes


def target_ds_config(ds: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3 config of the EMA target's engine: fp32, no optimizer, every parameter partitioned
    (a persistent, unpartitioned parameter would keep a full copy that partition updates miss)."""
    zero = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
    zero["stage3_param_persistence_threshold"] = 0
    return {**{k: ds[k] for k in BATCH_KEYS}, "zero_optimization": zero, "bf16": {"enabled": False},
            "steps_per_print": ds["steps_per_print"], "wall_clock_breakdown": False}


# ---------------------------------------------------------------- models


class OnlineModels(nn.Module):
    """The trained models under one engine; parameter names are `encoder.*` and `predictor.*`."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.encoder(images, masks_enc), masks_enc, masks_pred)


@dataclass
class DeepSpeedModels(JEPAModels):
    """`encoder` / `predictor` are the engine's submodules (for inspection and no-grad use); the
    trained forward goes through the engine, in one call."""

    engine: Any = None

    def predict(self, images: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        return self.engine(images, masks_enc, masks_pred)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the strategy


class DeepSpeedStrategy(Strategy):
    def __init__(self, dist_cfg: DistConfig | None = None, shape: RunShape | None = None) -> None:
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if not launched:  # one process without a launcher: a world of one on loopback
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        super().__init__()
        dist_cfg, shape = dist_cfg or DistConfig(), shape or RunShape()
        # Everything that can be wrong with the JSON is found here, before any process group,
        # engine or file exists: the CLI prints it as one line and exits with code 2.
        self.accum = accumulation_steps(shape.micro_batch, shape.global_batch, self.world_size)
        path = resolve_ds_config_path(dist_cfg.deepspeed_config)
        self.ds_config, notes = build_ds_config(
            read_ds_json(path), str(path), micro_batch=shape.micro_batch, accum=self.accum, world=self.world_size,
            clip_grad=shape.clip_grad, bf16=shape.bf16, zero_stage=dist_cfg.zero_stage)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.bf16 = shape.bf16
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # says so instead of guessing (and warning)
        try:
            import deepspeed
        except ImportError:
            raise ValueError("dist.strategy deepspeed needs the deepspeed package: "
                             "pip install -e '.[deepspeed]'") from None
        from deepspeed.utils import logger as ds_logger

        if not os.environ.get("PIJEPA_DEBUG"):  # one console line per log step, from rank 0
            ds_logger.setLevel(logging.WARNING)
            # DeepSpeed 0.19 calls these torch collectives on every step; torch warns every time.
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
        deepspeed.init_distributed(verbose=False, timeout=timedelta(minutes=30))
        if self.is_main:
            for note in notes:
                console(f"warning: {note}")

    # ------------------------------------------------------------------ setup

    def setup(self, models: JEPAModels, accum_steps: int, clip_grad: float,
              optimizer_kwargs: dict[str, Any]) -> JEPAModels:
        import deepspeed

        if accum_steps != self.accum:
            raise RuntimeError(f"accumulation {accum_steps} differs from the DeepSpeed config's {self.accum}")
        self.device = pick_device(self.local_rank)
        online = OnlineModels(models.encoder, models.predictor)
        optimizer = torch.optim.AdamW(param_groups(models), **optimizer_kwargs)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=online, optimizer=optimizer, config=copy.deepcopy(self.ds_config))
        target = models.target_encoder.requires_grad_(False)
        if self.stage == 3:
            self.target_engine, *_ = deepspeed.initialize(model=target, config=target_ds_config(self.ds_config))
            self.target_module, target_call = self.target_engine.module, self.target_engine
        else:
            self.target_module = target_call = target.to(self.device)
        self._micro = 0
        self._check_ema_pairs()
        module = self.engine.module
        return DeepSpeedModels(module.encoder, module.predictor, target_call, engine=self.engine)

    # ------------------------------------------------------------------ step

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/GAS itself
        self._micro += 1
        if self._micro < self.accum:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def optimizer_step(self, lr: float, weight_decay: float) -> tuple[torch.Tensor, bool]:
        if self._micro != self.accum or not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"optimizer_step after {self._micro} micro-steps; expected {self.accum}")
        set_lr_wd(self.optimizer, lr, weight_decay)
        # The boundary: clip (gradient_clipping), AdamW, zero the gradients. DeepSpeed's ZeRO
        # optimizers check the global norm themselves and skip the update when it is not finite.
        self.engine.step()
        self._micro = 0
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()  # pre-clipping norm over all ranks' gradients
        if norm is None:  # zero_optimization.compute_grad_norm: false
            return torch.tensor(float("nan")), applied
        norm = norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))
        return norm, applied and bool(torch.isfinite(norm))

    def local_tensors(self) -> list[torch.Tensor]:
        modules = (self.engine.module, self.target_module)
        return [getattr(p, "ds_tensor", p) for m in modules for p in m.parameters()]  # ZeRO-3: partitions

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target, source) tensors of the trainable encoder parameters, paired by name. ZeRO-3: this
        rank's fp32 target partition and the optimizer's fp32 master partition of the same elements
        (looked up at every update: DeepSpeed may re-point them, e.g. on load)."""
        from deepspeed.utils import safe_get_local_fp32_param

        online = dict(self.engine.module.encoder.named_parameters())
        targets, sources = [], []
        for name, t in self.target_module.named_parameters():
            o = online[name]
            if not o.requires_grad:  # frozen positional embeddings are equal already
                continue
            if self.stage == 3:
                targets.append(t.ds_tensor)
                sources.append(safe_get_local_fp32_param(o))
            else:
                targets.append(t)
                sources.append(o)
        return targets, sources

    def _check_ema_pairs(self) -> None:
        online = {n for n, _ in self.engine.module.encoder.named_parameters()}
        names = {n for n, _ in self.target_module.named_parameters()}
        if online != names:
            raise RuntimeError(f"EMA target and encoder parameters differ: {sorted(online ^ names)[:5]}")
        for t, s in zip(*self._ema_pairs()):
            if t.dtype != torch.float32 or t.numel() != s.numel():
                raise RuntimeError(f"EMA tensors do not line up: target {tuple(t.shape)} {t.dtype}, "
                                   f"source {tuple(s.shape)} {s.dtype}")

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        targets, sources = self._ema_pairs()
        if self.stage == 3:
            sources = [s.view(t.shape) for t, s in zip(targets, sources)]
        if all(s.dtype == torch.float32 for s in sources):
            ema_update_(targets, sources, momentum)
            return
        # bf16 module weights: upcast a few tensors at a time (never a second full fp32 model).
        for i in range(0, len(targets), 32):
            ema_update_(targets[i:i + 32], [s.float() for s in sources[i:i + 32]], momentum)

    # ------------------------------------------------------------------ checkpoints

    def _full_target_state(self) -> dict[str, torch.Tensor]:
        """The fp32 target's full state dict on rank 0 (ZeRO-3: gathered one parameter at a time,
        read-only, so the peak is one parameter, not the model); {} on other ranks."""
        import deepspeed

        if self.stage != 3:
            return {n: t.detach().cpu().clone() for n, t in self.target_module.state_dict().items()} \
                if self.is_main else {}
        state = {}
        for name, p in self.target_module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):  # collective: every rank gathers
                if self.is_main:
                    state[name] = p.data.detach().cpu().clone()
        if self.is_main:
            state.update({n: b.detach().cpu().clone() for n, b in self.target_module.named_buffers()})
        return state

    def _load_target(self, state: dict[str, torch.Tensor], path: Path) -> None:
        import deepspeed

        if self.stage != 3:
            try:
                self.target_module.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{path}: target_encoder does not match this run's architecture: {e}") from None
            return
        missing = sorted({n for n, _ in self.target_module.named_parameters()} - set(state))
        if missing:
            raise ValueError(f"{path}: target_encoder lacks {missing[:5]}")
        for name, p in self.target_module.named_parameters():
            # modifier_rank=0: rank 0's write is re-partitioned to every rank on exit (without a
            # modifier rank the gathered copy is discarded, and the write with it).
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.is_main:
                    p.data.copy_(state[name].view_as(p.data))
        for name, b in self.target_module.named_buffers():
            b.copy_(state[name])

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        # Every rank writes its ZeRO partitions; DeepSpeed names files relative to `folder`.
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=True)
        target = self._full_target_state()
        if self.is_main:
            frozen = sorted(n for n, p in self.engine.module.named_parameters() if not p.requires_grad)
            torch.save({"format": FORMAT, "world_size": self.world_size, "zero_stage": self.stage,
                        "bf16": self.bf16, "optimizer": type(self.engine.optimizer).__name__, "frozen": frozen,
                        "target_encoder": target, "extra": extra},
                       folder / STATE_FILE)
        torch.save(extra["rng"], folder / rng_file(self.rank))
        self.barrier()

    def load(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        head = read_head(folder)
        for key, ours in (("world_size", self.world_size), ("zero_stage", self.stage)):
            if head[key] != ours:
                raise ValueError(
                    f"{folder}: written with {key} {head[key]}, this run has {ours}; a DeepSpeed checkpoint "
                    f"resumes with the same ranks and ZeRO stage (pijepa export consolidates it for a new run)")
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"{folder}: DeepSpeed found no checkpoint under tag {TAG!r}")
        self._load_target(head["target_encoder"], folder / STATE_FILE)
        self._micro = 0
        extra = dict(head["extra"])
        rng = folder / rng_file(self.rank)
        if rng.is_file():  # this rank's own RNG states (rank 0's are in `extra`)
            extra["rng"] = torch.load(rng, map_location="cpu", weights_only=True)
        self.barrier()
        return extra


# ---------------------------------------------------------------- reading a checkpoint offline


def read_head(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        hint = " (it holds state.pt: written by dist.strategy single or ddp)" \
            if (Path(folder) / "state.pt").is_file() else ""
        raise ValueError(f"{folder}: not a DeepSpeed checkpoint of pijepa, no {STATE_FILE}{hint}")
    head = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pijepa DeepSpeed checkpoint (expected format {FORMAT})")
    return head


def is_deepspeed_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def read_full_state(folder: Path) -> dict[str, Any]:
    """Full fp32 encoder / predictor / target state dicts, `extra` and the model description of a
    checkpoint folder, in this one process (any world size at save time); for `pijepa export`.

    The encoder and predictor come from the ZeRO fp32 master partitions, consolidated by
    DeepSpeed's zero_to_fp32 (also in bf16 runs: the master weights, not their bf16 copies)."""
    folder = Path(folder)
    head = read_head(folder)
    full = _fp32_master_weights(folder, head)
    # Frozen parameters (the fixed sin-cos positional embeddings) have no fp32 master: ZeRO-1
    # checkpoints leave them out of the consolidated dict and ZeRO-2/3 keep the module's copy (bf16
    # in bf16 runs). The encoder's are taken from the fp32 EMA target (never updated, so equal to
    # the encoder's), the predictor's from the module state that DeepSpeed saved.
    frozen = set(head["frozen"])
    full.update({f"encoder.{n}": v for n, v in head["target_encoder"].items() if f"encoder.{n}" in frozen})
    module_state = None
    for name in sorted(frozen - set(full)):
        if module_state is None:
            module_state = torch.load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                                      weights_only=False)["module"]
        full[name] = module_state[name]
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "predictor": {}}
    for name, tensor in full.items():
        owner, _, rest = name.partition(".")
        if owner not in parts:
            raise ValueError(f"{folder}: unexpected parameter {name!r} in the DeepSpeed checkpoint")
        parts[owner][rest] = tensor.float()
    return {**parts, "target_encoder": head["target_encoder"], "extra": head["extra"],
            "model": dict(head["extra"].get("model", {}))}


def _fp32_master_weights(folder: Path, head: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Consolidated fp32 master weights of the trained parameters, by engine parameter name."""
    if head.get("optimizer") == "BF16_Optimizer":  # ZeRO-1 + bf16 + fp32 gradient accumulation
        return _merge_bf16_optimizer_partitions(folder / TAG)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))


def _merge_bf16_optimizer_partitions(ds_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer checkpoint, which zero_to_fp32 does not read: every rank's file
    holds its fp32 partition of each param group and, per parameter name, the fragment of it that
    the partition holds (offset, length). A parameter's fragments, in rank order, are its elements."""
    files = sorted(ds_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(f.name.split("_")[4]))
    model_states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, fragment in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    return {name: torch.cat(parts).view(shapes[name]) for name, parts in pieces.items()}
