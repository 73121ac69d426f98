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
  `rng_rank{r}.pt` (every rank's RNG states). The layout and its offline reader (`pijepa export`)
  are in deepspeed_checkpoint.py.
- The DeepSpeed JSON (dist.deepspeed_config) holds the ZeRO settings; the keys that pijepa's
  config already decides are derived from it (deepspeed_config.py; see ds_configs/README.md).
"""

from __future__ import annotations

import copy
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

from pijepa.parallel.base import JEPAModels, Strategy, ema_update_, param_groups, rng_file, set_lr_wd
from pijepa.parallel.deepspeed_checkpoint import FORMAT, STATE_FILE, TAG, read_head
from pijepa.parallel.deepspeed_config import (
    build_ds_config,
    read_ds_json,
    resolve_ds_config_path,
    target_ds_config,
)
from pijepa.parallel.options import DistConfig, RunShape, accumulation_steps
from pijepa.parallel.single import pick_device
from pijepa.runtime.errors import CheckpointError, LaunchError
from pijepa.runtime.log import warn

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
            raise LaunchError("dist.strategy deepspeed needs the deepspeed package: "
                              "pip install -e '.[deepspeed]'") from None
        from deepspeed.utils import logger as ds_logger

        if not os.environ.get("PIJEPA_DEBUG"):  # one console line per log step, from rank 0
            ds_logger.setLevel(logging.WARNING)
            # DeepSpeed 0.19 calls these torch collectives on every step; torch warns every time.
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
        deepspeed.init_distributed(verbose=False, timeout=timedelta(minutes=30))
        for note in notes:  # rank 0 prints them (pijepa.runtime.log)
            warn(note)

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
                raise CheckpointError(f"{path}: target_encoder does not match this run's architecture: {e}") from None
            return
        missing = sorted({n for n, _ in self.target_module.named_parameters()} - set(state))
        if missing:
            raise CheckpointError(f"{path}: target_encoder lacks {missing[:5]}")
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
                raise CheckpointError(
                    f"{folder}: written with {key} {head[key]}, this run has {ours}; a DeepSpeed checkpoint "
                    f"resumes with the same ranks and ZeRO stage (pijepa export consolidates it for a new run)")
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint under tag {TAG!r}")
        self._load_target(head["target_encoder"], folder / STATE_FILE)
        self._micro = 0
        extra = dict(head["extra"])
        rng = folder / rng_file(self.rank)
        if rng.is_file():  # this rank's own RNG states (rank 0's are in `extra`)
            extra["rng"] = torch.load(rng, map_location="cpu", weights_only=True)
        self.barrier()
        return extra
