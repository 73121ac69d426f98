"""FSDP2 (`fully_shard`) strategy: sharded encoder, predictor and EMA target; DCP checkpoints.

- Parameters, gradients and AdamW state are sharded over a 1-D mesh (`full`, `grad_op`) or a 2-D
  (replicate, shard) mesh (`hybrid`, HSDP). The sharded parameters are fp32 DTensors even under
  bf16 mixed precision (FSDP casts only the gathered copies), so the optimizer and the EMA work on
  fp32 shards.
- The EMA target is sharded exactly like the encoder (same mesh, same per-block grouping), so the
  target's local shard of a parameter covers the same elements as the encoder's: the EMA update is
  one foreach lerp over local tensors, never a gather.
- Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its shards into the
  step folder; DCP records the global layout, so a checkpoint loads at any world size. Rank 0 adds
  `extra.pt` (step, config, model description); each rank adds `rng_rank{r}.pt`.

Folder layout written by `save`:
    .metadata, __{rank}_{i}.distcp   DCP: encoder, predictor, target_encoder, optimizer (flattened)
    extra.pt                          {"format", "world_size", "extra"} (rank 0)
    rng_rank{r}.pt                    rank r's RNG states
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from pijepa.parallel.base import (
    JEPAModels,
    Strategy,
    ema_update_,
    make_adamw,
    param_groups,
    rng_file,
    set_lr_wd,
    start_process_group,
    step_if_finite,
)
from pijepa.parallel.formats import written_by
from pijepa.parallel.materialize import blueprint, materialize, on_meta
from pijepa.parallel.options import DistConfig, RunShape
from pijepa.parallel.parallelize import apply_ac, apply_compile, apply_fsdp, canonical_name
from pijepa.parallel.single import pick_device
from pijepa.runtime.errors import CheckpointError, ConfigError, LaunchError
from pijepa.runtime.log import console

FORMAT = "pijepa-fsdp-v1"
METADATA_FILE = ".metadata"  # written by DCP; its presence identifies the format
EXTRA_FILE = "extra.pt"
MODEL_PARTS = ("encoder", "predictor", "target_encoder")
# Optimizer state keyed by parameter name (not by position), flattened: loads at any world size.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# The ranks on this node, by the launcher that set them: torchrun, DeepSpeed's launcher, then srun
# starting one task per rank (its --ntasks-per-node). `hybrid` shards within a node by default.
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def ranks_per_node(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(ranks on this node, the variable it came from), or None when no launcher says."""
    for name in LOCAL_SIZE_VARS:
        value = environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit() or int(value) < 1:
            raise LaunchError(f"{name}={value!r}: expected the number of ranks on this node (a positive integer)")
        return int(value), name
    return None


def hybrid_shard_size(hybrid_shard_size: int, world_size: int, environ: Mapping[str, str]) -> tuple[int, str]:
    """Ranks per shard group of `hybrid` and where that number came from: dist.hybrid_shard_size,
    else the ranks of one node as the launcher gives them; refused when neither is known (a
    silent fallback to one shard group over every rank would be plain FSDP across nodes)."""
    if hybrid_shard_size:
        shard, source = hybrid_shard_size, "dist.hybrid_shard_size"
    else:
        found = ranks_per_node(environ)
        if found is None:
            raise LaunchError(f"dist.fsdp_sharding hybrid with dist.hybrid_shard_size 0 shards within a node, but "
                              f"the launcher set none of {', '.join(LOCAL_SIZE_VARS)}; set dist.hybrid_shard_size "
                              f"to the ranks per shard group")
        shard, source = found
    if world_size % shard:
        raise ConfigError(f"dist.hybrid_shard_size {shard} (from {source}) must divide the world size {world_size}")
    return shard, source


def build_mesh(device_type: str, world_size: int, sharding: str, shard: int) -> DeviceMesh:
    """1-D ("shard",) mesh for full/grad_op; 2-D ("replicate", "shard") for hybrid, with `shard`
    ranks per shard group (hybrid_shard_size's answer; it divides the world size)."""
    if sharding != "hybrid":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


class FSDPStrategy(Strategy):
    builds_on_meta = True  # shards first, then draws only this rank's shards (materialize.py)

    def __init__(self, dist_cfg: DistConfig | None = None, shape: RunShape | None = None) -> None:
        super().__init__()
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            # A LaunchError: the CLI prints it as one line (exit code 2), no traceback.
            raise LaunchError("dist.strategy fsdp needs a distributed launch: start it with torchrun "
                             "(e.g. torchrun --nproc_per_node 2 -m pijepa train ...), which sets RANK, "
                             "WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        self.cfg, self.bf16 = dist_cfg or DistConfig(), (shape or RunShape()).bf16
        # Resolved before the process group starts: a launch that cannot say fails at once.
        self._hybrid = (hybrid_shard_size(self.cfg.hybrid_shard_size, self.world_size, os.environ)
                        if self.cfg.fsdp_sharding == "hybrid" else None)
        # The GPU is chosen before NCCL starts, so that its communicators bind to LOCAL_RANK's GPU.
        self.device = pick_device(self.local_rank)
        start_process_group(self.cfg.timeout)
        # The mesh is made with the process group, before any model exists (as torchtitan's
        # ParallelDims does): making it reads rank lists back to the host, which a caller that
        # then builds the models on fake tensors (pijepa.rehearsal) could not do in fake mode.
        shard = self._hybrid[0] if self._hybrid else self.world_size
        self.mesh = build_mesh(self.device.type, self.world_size, self.cfg.fsdp_sharding, shard)
        # A gloo group for async saves, apart from the training collectives.
        self._ckpt_group: dist.ProcessGroup | None = None
        self._pending: Future | None = None

    # ------------------------------------------------------------------ setup

    def setup(self, models: JEPAModels, accum_steps: int, clip_grad: float,
              optimizer_kwargs: dict[str, Any]) -> JEPAModels:
        c = self.cfg
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        if self._hybrid:
            shard, source = self._hybrid
            console(f"FSDP hybrid: {self.world_size // shard} replica group(s) x {shard} rank(s) per shard group "
                    f"(from {source})")
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.bf16 else MixedPrecisionPolicy())
        encoder, predictor, target = models.encoder, models.predictor, models.target_encoder
        target.requires_grad_(False)
        plan = blueprint(models) if on_meta(models) else None

        # Fixed order: AC -> compile -> FSDP (see parallelize.py). The target runs no-grad
        # forwards only, so it gets no AC; it is compiled like the encoder.
        for m in (encoder, predictor):
            apply_ac(m, c.activation_checkpointing, c.ac_every)
        if c.compile:
            for m in (encoder, predictor, target):
                apply_compile(m)
        keep_gathered = c.fsdp_sharding == "grad_op"
        for m in (encoder, predictor):
            apply_fsdp(m, self.mesh, mp, reshard_after_forward=not keep_gathered)
        apply_fsdp(target, self.mesh, mp, reshard_after_forward=True, reshard_root=True)

        self.models = JEPAModels(encoder, predictor, target)
        if plan is not None:  # built on meta: this rank's shards get storage and weights now
            materialize(self.models, plan, self.device)
        self._fsdp_trainable = [m for m in self.models.trainable() if isinstance(m, FSDPModule)]
        if accum_steps > 1:  # gathered once per optimizer step, kept across micro-steps (micro_step)
            for m in self._fsdp_trainable:
                m.set_reshard_after_forward(False)
        # One module owning both trainable models names the optimizer state by parameter FQN.
        self._optim_owner = nn.ModuleDict({"encoder": encoder, "predictor": predictor})
        # The predictor's output is a view (Linear on [B, K, D]); FSDP warns on every rank that an
        # in-place op on it would skip its pre-backward hook. The losses never write into their
        # inputs (tests/distributed/test_fsdp.py compares the trajectory with one process), so it is noise.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPVisionTransformerPredictor\) "
                                r"returned a view tensor")
        self.params = [p for m in self.models.trainable() for p in m.parameters() if p.requires_grad]
        self.optimizer = make_adamw(param_groups(self.models), self.device, **optimizer_kwargs)
        self._check_ema_pairs()
        if c.async_checkpoint:
            group = dist.new_group(backend="gloo")  # every rank is a member: a ProcessGroup
            self._ckpt_group = group if isinstance(group, dist.ProcessGroup) else None
        return self.models

    # ------------------------------------------------------------------ step

    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        # With accumulation, gradients accumulate unsharded and unreduced until the last
        # micro-step, whose backward reduce-scatters the sum once; and the encoder's and
        # predictor's parameters, gathered in the first micro-step's forward, stay gathered until
        # the last backward (no all-gather on the micro-steps between). pijepa.plan.costs.fsdp
        # prices both: one all-gather instead of one or two per micro-step, for the whole
        # model's gathered weights held meanwhile.
        if self.accum_steps > 1:
            for m in self._fsdp_trainable:
                m.set_requires_gradient_sync(is_last)
                m.set_reshard_after_backward(is_last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def optimizer_step(self, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        set_lr_wd(self.optimizer, lr, weight_decay)
        grads = [p.grad for p in self.params if p.grad is not None]
        # The norm of sharded DTensor grads is a partial result per rank; full_tensor() reduces it
        # to the norm over the whole model (all shards, all replicas), identical on every rank.
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        return total, step_if_finite(self.optimizer, self.params, total, self.clip_grad)

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Local fp32 shards of (target, encoder) parameters paired by canonical name. Looked up
        at every update (a few hundred names): a load may re-point FSDP's sharded parameters."""
        online = {canonical_name(n): p for n, p in self.models.encoder.named_parameters()}
        target, source = [], []
        for name, p in self.models.target_encoder.named_parameters():
            q = online[canonical_name(name)]
            if q.requires_grad:  # frozen positional embeddings are equal already
                target.append(p.to_local() if isinstance(p, DTensor) else p)
                source.append(q.to_local() if isinstance(q, DTensor) else q)
        return target, source

    @torch.no_grad()
    def _check_ema_pairs(self) -> None:
        online = {canonical_name(n) for n in self.models.encoder.state_dict()}
        names = {canonical_name(n) for n in self.models.target_encoder.state_dict()}
        if online != names:
            raise RuntimeError(f"EMA target and encoder parameters differ: {sorted(online ^ names)[:5]}")
        for t, s in zip(*self._ema_pairs()):
            if t.shape != s.shape or t.dtype != torch.float32 or s.dtype != torch.float32:
                raise RuntimeError(f"EMA shards do not line up: target {tuple(t.shape)} {t.dtype}, "
                                   f"encoder {tuple(s.shape)} {s.dtype}")

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        target, source = self._ema_pairs()
        ema_update_(target, source, momentum)

    # ------------------------------------------------------------------ checkpoints

    def _state_dict(self) -> dict[str, Any]:
        """Sharded (DTensor) state keyed by canonical names, for DCP to save into or load from."""
        state: dict[str, Any] = {name: get_model_state_dict(getattr(self.models, name)) for name in MODEL_PARTS}
        state["optimizer"] = get_optimizer_state_dict(self._optim_owner, self.optimizer, options=_OPTIM_OPTIONS)
        return state

    def save(self, folder: Path, extra: dict[str, Any]) -> Future | None:
        self.wait()
        state = self._state_dict()

        def write_head() -> None:
            if self.is_main:
                torch.save({"format": FORMAT, "world_size": self.world_size, "extra": extra}, folder / EXTRA_FILE)
            torch.save(extra["rng"], folder / rng_file(self.rank))

        self.agree_on_write(folder, write_head)  # before DCP's collectives: all ranks go on or none
        if not self.cfg.async_checkpoint:
            dcp.save(state, checkpoint_id=str(folder))
            return None
        # The state is copied to CPU memory before async_save returns, so training may go on;
        # the files are written by a background thread. The Checkpointer renames the folder only
        # after the returned future is done on every rank.
        saving = dcp.async_save(state, checkpoint_id=str(folder), process_group=self._ckpt_group)
        # A Future, or (with a zero-overhead stager, not used here) both futures in a response.
        self._pending = saving.upload_completion if isinstance(saving, AsyncSaveResponse) else saving
        return self._pending

    def finished_save(self, folder: Path) -> bool:
        # DCP writes `.metadata` last: its coordinator writes it once every rank's shards are
        # written (it gathers their write results first), aside, fsynced, then renamed into place.
        # `extra.pt` and each rank's RNG file are written before that rank enters the save.
        if not (folder / METADATA_FILE).is_file():
            return False
        try:
            world_size = int(read_head(folder)["world_size"])
        except Exception:  # a damaged extra.pt: not a save to complete
            return False
        return all((folder / rng_file(r)).is_file() for r in range(world_size))

    def wait(self) -> None:
        """Blocks until this rank's part of an asynchronous save in flight is written."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def load(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        head = read_head(folder)
        state = self._state_dict()
        try:
            dcp.load(state, checkpoint_id=str(folder))
        except Exception as e:  # missing keys / shape mismatch: a checkpoint of another architecture
            raise CheckpointError(f"{folder}: does not match this run's models and optimizer: "
                                  f"{str(e).strip().splitlines()[-1][:500]}") from None
        for name in MODEL_PARTS:
            set_model_state_dict(getattr(self.models, name), state[name])
        set_optimizer_state_dict(self._optim_owner, self.optimizer, state["optimizer"], options=_OPTIM_OPTIONS)
        # Each rank resumes its own RNG stream; ranks beyond the saved world size reuse one of the
        # saved streams (nothing in the step depends on it: data and masks are step-addressed).
        extra = dict(head["extra"])
        extra["rng"] = torch.load(folder / rng_file(self.rank % int(head["world_size"])), weights_only=True)
        return extra

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wait()
        super().close()


def read_full_state(folder: Path) -> dict[str, Any]:
    """Unsharded encoder / predictor / target state dicts and `extra` of a checkpoint folder, read
    in this one process (no process group, any world size at save time); for `pijepa export`.
    The plain tensors to read into are made from DCP's metadata (global shapes and dtypes); the
    optimizer state is not read."""
    folder = Path(folder)
    head = read_head(folder)
    reader = FileSystemReader(folder)
    metadata = reader.read_metadata()
    state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in MODEL_PARTS}
    for key, entry in metadata.state_dict_metadata.items():
        # The saved dict was {part: {fqn: tensor}}: planner_data maps each flat key to that path.
        part, *rest = (metadata.planner_data or {}).get(key, key.split(".", 1))
        if part not in state:
            continue
        if not isinstance(entry, TensorStorageMetadata) or len(rest) != 1:
            raise CheckpointError(f"{folder}: {key} is not a tensor of {part} (expected model state dicts)")
        state[part][str(rest[0])] = torch.empty(entry.size, dtype=entry.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... a single process" is the intent
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {**state, "extra": head["extra"]}


def read_head(folder: Path) -> dict[str, Any]:
    """`extra.pt` of an FSDP checkpoint folder; a folder of another strategy is a CheckpointError."""
    if not (folder / METADATA_FILE).is_file() or not (folder / EXTRA_FILE).is_file():
        raise CheckpointError(f"{folder}: not an FSDP checkpoint (expected DCP {METADATA_FILE} and {EXTRA_FILE})"
                              f"{written_by(folder)}; dist.strategy fsdp resumes only from checkpoints written "
                              f"by fsdp")
    head = torch.load(folder / EXTRA_FILE, map_location="cpu", weights_only=True)
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CheckpointError(f"{folder / EXTRA_FILE}: not a pijepa FSDP checkpoint (expected format {FORMAT})")
    return head
