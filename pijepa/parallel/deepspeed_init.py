"""ZeRO-3 models built on the meta device: every parameter drawn in full, then partitioned at once.

`deepspeed.initialize` partitions a model built in full (it runs `deepspeed.zero.Init(module=...)`
over all of its parameters, cast first to the engine's dtype). For models built on meta
(`builds_on_meta`), `partition_from_meta` does that conversion before the engines exist, a few
parameters at a time: each is drawn in full on the CPU as the full build draws it
(pijepa.models.init), cast as the engine would cast it, put in place of the meta parameter and
handed to `zero.Init(module=...)` with the engine's DeepSpeed config, which keeps this rank's
partition and frees the rest. The engines then find the parameters partitioned already and leave
them as they are. The encoder's values go into the encoder (the online engine's dtype) and into
the target (fp32, its own config). A rank holds at most a batch of `_BATCH_BYTES` of full
parameters per model (and one transformer block being drawn), never a whole model.
"""

from __future__ import annotations

import copy
import ctypes
from typing import Any

import torch
from torch import nn

from pijepa.models.init import draw_weights
from pijepa.parallel.base import JEPAModels
from pijepa.parallel.materialize import blueprint

_BATCH_BYTES = 1 << 27  # full parameters collected before one zero.Init partitions them (128 MiB)


class _Partitioner:
    """Puts drawn values in place of one model's meta parameters, and partitions them in batches."""

    def __init__(self, model: nn.Module, ds_config: dict[str, Any]) -> None:
        self.model, self.ds_config = model, ds_config
        self.dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        self.pending: list[nn.Parameter] = []
        self.size = 0

    def put(self, name: str, full: torch.Tensor) -> None:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        old = owner.get_parameter(leaf)
        # A new Parameter: a meta one cannot take CPU data. A copy, even in fp32: the encoder's
        # value also goes into the target, and partitioning frees what it is given.
        param = nn.Parameter(full.to(self.dtype, copy=True), requires_grad=old.requires_grad)
        setattr(owner, leaf, param)
        self.pending.append(param)
        self.size += param.numel() * param.element_size()
        if self.size >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        import deepspeed

        if not self.pending:
            return
        holder = nn.Module()  # zero.Init(module=...) converts every parameter of the module given
        for i, param in enumerate(self.pending):
            holder.register_parameter(f"p{i}", param)
        deepspeed.zero.Init(module=holder, config_dict_or_path=copy.deepcopy(self.ds_config), dtype=self.dtype)
        self.pending, self.size = [], 0


@torch.no_grad()
def partition_from_meta(models: JEPAModels, ds_config: dict[str, Any], target_config: dict[str, Any]) -> None:
    """Draws the weights of ZeRO-3 `models` built on meta into ZeRO-3 partitions, in place (before
    any wrapping): the encoder and predictor as the online engine (`ds_config`) would have
    partitioned them, the target as its engine (`target_config`) would have. The CPU generator is
    left where the full build leaves it."""
    plan = blueprint(models)
    into = [[_Partitioner(models.encoder, ds_config), _Partitioner(models.target_encoder, target_config)],
            [_Partitioner(models.predictor, ds_config)]]
    torch.set_rng_state(plan.init_rng)
    for index, name, full in draw_weights(plan.models):
        for partitioner in into[index]:
            partitioner.put(name, full)
    for partitioner in (*into[0], *into[1]):
        partitioner.flush()
    left = [n for m in (models.encoder, models.predictor, models.target_encoder)
            for n, p in m.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters left undrawn: {left[:5]}")
    return_freed_heap()


def return_freed_heap() -> None:
    """Gives the heap memory freed by the draws back to the OS (glibc's malloc_trim; a no-op
    without glibc). Freed between the partitions that stay, glibc would keep it mapped, and on a
    CPU run the engines' large buffers (mapped apart) would come on top: measured 0.6 GiB of the
    2-rank ViT-L/16's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
