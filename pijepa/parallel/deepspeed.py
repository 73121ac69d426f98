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
- EMA target: fp32, outside the engine (DeepSpeed's bf16 mode would cast anything inside it), and
  it always follows the fp32 master weights. ZeRO-1/2: a replicated fp32 module. In fp32 runs the
  engine's module parameters are the master weights (copied back after every step), so it moves
  towards them, without communication. In bf16 runs they are bf16 roundings of the master (up to
  2^-8 relative off: bf16 keeps 8 significant bits), so the target moves towards the fp32 master
  itself, assembled per parameter from the ranks' optimizer partitions by DeepSpeed's
  `safe_get_full_fp32_param` (an all-reduce of the encoder in fp32 per step). ZeRO-3: the target
  is partitioned like the encoder, by a second ZeRO-3 engine without optimizer (fp32, every
  parameter partitioned), and each rank lerps its target partitions towards the optimizer's fp32
  master partitions of the encoder (`safe_get_local_fp32_param`): exact, no communication, and the
  forward gathers it layer by layer like the encoder's.
- `dist.activation_checkpointing` / `dist.compile` are applied to the blocks before
  `deepspeed.initialize` (parallelize.prepare_blocks: AC, then compile in place, so the engine's
  parameter names, which name the ZeRO partitions in checkpoints, only gain checkpoint_wrapper's
  `_checkpoint_wrapped_module.`, which canonical_name drops wherever names are compared or saved).
- Optimizer: torch AdamW; with `zero_optimization.offload_optimizer` (the AdamW step runs on the
  CPU) DeepSpeed's CPU Adam in AdamW mode, the optimizer DeepSpeed requires there (it builds a C++
  op on first use).
- Checkpoints: DeepSpeed's own `save_checkpoint` into `<step folder>/ds/` (model + ZeRO optimizer
  partitions; every rank writes its part; paths are relative to the folder, so the Checkpointer's
  rename is safe; DeepSpeed also writes `latest` and `zero_to_fp32.py` there). Next to it:
  `ds_state.pt` (rank 0: format, world size, stage, the full fp32 EMA target and `extra`) and
  `rng_rank{r}.pt` (every rank's RNG states). The layout and its offline reader (`pijepa export`)
  are in deepspeed_checkpoint.py; resuming at another world size goes through DeepSpeed's universal
  checkpoint (deepspeed_reshard.py).
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pijepa.parallel.base import (
    JEPAModels,
    Strategy,
    ema_update_,
    make_adamw,
    param_groups,
    rng_file,
    set_lr_wd,
    start_process_group,
)
from pijepa.parallel.deepspeed_checkpoint import FORMAT, STATE_FILE, TAG, read_head
from pijepa.parallel.deepspeed_config import (
    build_ds_config,
    offloads_optimizer,
    read_ds_json,
    resolve_ds_config_path,
    target_ds_config,
)
from pijepa.parallel.deepspeed_init import partition_from_meta
from pijepa.parallel.deepspeed_reshard import load_at_new_world_size
from pijepa.parallel.materialize import on_meta
from pijepa.parallel.options import DistConfig, RunShape, accumulation_steps
from pijepa.parallel.parallelize import canonical_name, prepare_blocks
from pijepa.parallel.single import pick_device
from pijepa.runtime.errors import CheckpointError, ConfigError, LaunchError
from pijepa.runtime.log import warn

_EMA_CHUNK = 1 << 26  # elements of fp32 master weights assembled at a time for the EMA (256 MB)

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
        self.builds_on_meta = self.stage == 3  # partitions each parameter as it is drawn (deepspeed_init.py)
        self.bf16, self.cfg = shape.bf16, dist_cfg
        if dist_cfg.compile and self.stage == 3:
            # Measured (torch 2.14, DeepSpeed 0.19): ZeRO-3's gather / release hooks on every layer
            # are excluded from compilation, so each compiled block falls apart into single layers
            # and recompiles past torch's limit: slower than not compiling.
            raise ConfigError(f"{path}: dist.compile is not supported with ZeRO-3 (DeepSpeed's per-layer "
                              f"parameter hooks break each compiled block apart); use ZeRO-1/2 or "
                              f"dist.strategy fsdp to compile, or set dist.compile false")
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
        start_process_group(self.cfg.timeout)  # DeepSpeed takes the group it finds
        deepspeed.init_distributed(verbose=False, timeout=self.cfg.timeout)
        for note in notes:  # rank 0 prints them (pijepa.runtime.log)
            warn(note)

    # ------------------------------------------------------------------ setup

    def setup(self, models: JEPAModels, accum_steps: int, clip_grad: float,
              optimizer_kwargs: dict[str, Any]) -> JEPAModels:
        import deepspeed

        if accum_steps != self.accum:
            raise RuntimeError(f"accumulation {accum_steps} differs from the DeepSpeed config's {self.accum}")
        self.device = pick_device(self.local_rank)
        target = models.target_encoder.requires_grad_(False)
        if on_meta(models):  # ZeRO-3 built on meta: drawn and partitioned a few parameters at a time
            partition_from_meta(models, self.ds_config, target_ds_config(self.ds_config))
        c = self.cfg  # AC -> compile, then the engine wraps the models (the order FSDP uses)
        prepare_blocks(models.trainable(), target, c.activation_checkpointing, c.ac_every, c.compile)
        online = OnlineModels(models.encoder, models.predictor)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=online, optimizer=self._client_optimizer(models, optimizer_kwargs),
            config=copy.deepcopy(self.ds_config))
        if self.stage == 3:
            self.target_engine, *_ = deepspeed.initialize(model=target, config=target_ds_config(self.ds_config))
            self.target_module, target_call = self.target_engine.module, self.target_engine
        else:
            self.target_module = target_call = target.to(self.device)
        self._micro = 0
        self._ema_cache: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._check_ema_pairs()
        module = self.engine.module
        return DeepSpeedModels(module.encoder, module.predictor, target_call, engine=self.engine)

    def _client_optimizer(self, models: JEPAModels, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        if not offloads_optimizer(self.ds_config):
            return make_adamw(param_groups(models), self.device, **kwargs)
        # DeepSpeed refuses a torch optimizer with optimizer offload (its step would run per
        # tensor in Python on the CPU); its CPU Adam in AdamW mode is torch's AdamW rule, and it
        # reads lr and weight decay from the param groups at every step, as torch's does.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups(models), adamw_mode=True, **kwargs)

    # ------------------------------------------------------------------ step

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/GAS itself
        self._micro += 1
        if self._micro < self.accum:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def optimizer_step(self, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self._micro != self.accum or not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"optimizer_step after {self._micro} micro-steps; expected {self.accum}")
        set_lr_wd(self.optimizer, lr, weight_decay)
        # The boundary: clip (gradient_clipping), AdamW, zero the gradients. DeepSpeed's ZeRO
        # optimizers check the global norm themselves and skip the update when it is not finite.
        self.engine.step()
        self._micro = 0
        applied = self.engine.was_step_applied()  # DeepSpeed decided on the host already
        norm = self.engine.get_global_grad_norm()  # pre-clipping norm over all ranks' gradients
        if norm is None:  # zero_optimization.compute_grad_norm: false
            return torch.tensor(float("nan")), torch.tensor(applied)
        norm = norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))
        # on the norm's device: no copy back to the host
        return norm, torch.isfinite(norm) & applied

    def local_tensors(self) -> list[torch.Tensor]:
        modules = (self.engine.module, self.target_module)
        return [getattr(p, "ds_tensor", p) for m in modules for p in m.parameters()]  # ZeRO-3: partitions

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target, source) tensors of the trainable encoder parameters, paired by name. ZeRO-3: this
        rank's fp32 target partition and the optimizer's fp32 master partition of the same elements,
        viewed in the target's shape. Cached: `setup` and `load` (where DeepSpeed may re-point the
        partitions) clear the cache; a lookup per parameter and step would cost a host round trip each."""
        if self._ema_cache is None:
            self._ema_cache = self._find_ema_pairs()
        return self._ema_cache

    def _find_ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from deepspeed.utils import safe_get_local_fp32_param

        online = {canonical_name(n): p for n, p in self.engine.module.encoder.named_parameters()}
        targets, sources = [], []
        for name, t in self.target_module.named_parameters():
            o = online[canonical_name(name)]
            if not o.requires_grad:  # frozen positional embeddings are equal already
                continue
            if self.stage == 3:
                targets.append(t.ds_tensor)
                sources.append(safe_get_local_fp32_param(o).view(t.ds_tensor.shape))
            else:
                targets.append(t)
                sources.append(o)
        return targets, sources

    def _check_ema_pairs(self) -> None:
        online = {canonical_name(n) for n, _ in self.engine.module.encoder.named_parameters()}
        names = {canonical_name(n) for n, _ in self.target_module.named_parameters()}
        if online != names:
            raise RuntimeError(f"EMA target and encoder parameters differ: {sorted(online ^ names)[:5]}")
        for t, s in zip(*self._ema_pairs()):
            if t.dtype != torch.float32 or t.numel() != s.numel():
                raise RuntimeError(f"EMA tensors do not line up: target {tuple(t.shape)} {t.dtype}, "
                                   f"source {tuple(s.shape)} {s.dtype}")

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        targets, sources = self._ema_pairs()
        if self.stage == 3:  # this rank's master partitions (on the CPU with optimizer offload)
            ema_update_(targets, [s.to(t.device) for t, s in zip(targets, sources)], momentum)
        elif not self.bf16:  # fp32 module parameters: the master weights themselves
            ema_update_(targets, sources, momentum)
        else:
            self._ema_from_fp32_master(targets, sources, momentum)

    def _ema_from_fp32_master(self, targets: list[torch.Tensor], sources: list[torch.Tensor],
                              momentum: float) -> None:
        """ZeRO-1/2 bf16: every rank holds a partition of the fp32 master; each parameter's is
        assembled (a collective, on every rank, in the same order) a few at a time, up to
        `_EMA_CHUNK` elements, so the peak is a few parameters in fp32, never a second model."""
        from deepspeed.utils import safe_get_full_fp32_param

        i = 0
        while i < len(targets):
            j, size = i, 0
            while j < len(targets) and (j == i or size + targets[j].numel() <= _EMA_CHUNK):
                size, j = size + targets[j].numel(), j + 1
            master = [safe_get_full_fp32_param(s) for s in sources[i:j]]
            ema_update_(targets[i:j], [m.to(t.device) for t, m in zip(targets[i:j], master)], momentum)
            i = j

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
        # Every rank writes its ZeRO partitions; DeepSpeed names files relative to `folder`. A write
        # that fails on some ranks only, inside DeepSpeed's own collectives, ends at dist.timeout_s.
        self.agree_on_write(folder, lambda: self.engine.save_checkpoint(str(folder), tag=TAG, client_state={},
                                                                        save_latest=True))
        target = self._full_target_state()

        def write_head() -> None:
            if self.is_main:
                frozen = sorted(canonical_name(n) for n, p in self.engine.module.named_parameters()
                                if not p.requires_grad)
                torch.save({"format": FORMAT, "world_size": self.world_size, "zero_stage": self.stage,
                            "bf16": self.bf16, "optimizer": type(self.engine.optimizer).__name__, "frozen": frozen,
                            "target_encoder": target, "extra": extra},
                           folder / STATE_FILE)
            torch.save(extra["rng"], folder / rng_file(self.rank))

        self.agree_on_write(folder, write_head)

    def load(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        head = read_head(folder)
        saved_world = int(head["world_size"])
        if head["zero_stage"] != self.stage:
            raise CheckpointError(
                f"{folder}: written with ZeRO stage {head['zero_stage']}, this run has {self.stage}; a DeepSpeed "
                f"checkpoint resumes with its own ZeRO stage (set dist.zero_stage {head['zero_stage']}; pijepa "
                f"export consolidates it for a new run)")
        if saved_world != self.world_size:  # re-partitioned through DeepSpeed's universal checkpoint
            load_at_new_world_size(self, self.engine, folder, saved_world)
        else:
            load_path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint under tag {TAG!r}")
        self._load_target(head["target_encoder"], folder / STATE_FILE)  # full fp32: any world size
        self._micro, self._ema_cache = 0, None
        extra = dict(head["extra"])
        # Each rank resumes its own RNG stream; ranks beyond the saved world size reuse one of the
        # saved streams, as under FSDP (nothing in the step draws from it: data and masks are
        # step-addressed). Checkpoints that lack a rank's file keep rank 0's, from `extra`.
        rng = folder / rng_file(self.rank % saved_world)
        if rng.is_file():
            extra["rng"] = torch.load(rng, map_location="cpu", weights_only=True)
        self.barrier()
        return extra
