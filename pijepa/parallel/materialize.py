"""Weights for models built on the meta device, drawn after sharding, one parameter at a time.

A strategy that `builds_on_meta` gets storage-free models (build_models(cfg, "meta")), takes
a `blueprint` of them before it wraps them, shards them, gives them empty storage on its device
(`to_empty`: only this rank's shards) and calls `materialize`: every parameter is drawn in full
on the CPU, in the order and from the generator state of the full CPU build (pijepa.models.init),
this rank's part of it is copied into the sharded parameter, and the full value is dropped. The
weights are then bit for bit the single-process build's, and the peak host memory is about this
rank's shards plus one transformer block, not the whole encoder, predictor and target. Under fake
tensors (a rehearsal of the run, pijepa.rehearsal) the models only get their fake storage, as
torchtitan skips its weight init there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from pijepa.models.init import draw_weights
from pijepa.parallel.base import JEPAModels
from pijepa.parallel.parallelize import canonical_name
from pijepa.runtime.torch_private import in_fake_mode


def on_meta(models: JEPAModels) -> bool:
    """Whether the models were built on the meta device (then they carry `init_rng`)."""
    return any(p.is_meta for p in models.encoder.parameters())


@dataclass
class Blueprint:
    """What `materialize` draws from: unwrapped, storage-free copies of the encoder and the
    predictor (in build order; their shapes and settings are read) and the generator state the
    build started from."""

    models: list[nn.Module]
    init_rng: torch.Tensor


def blueprint(models: JEPAModels) -> Blueprint:
    """To take from models built on meta before wrapping or sharding them."""
    if models.init_rng is None:
        raise ValueError("models built on the meta device carry init_rng (build_models(cfg, 'meta') sets it)")
    return Blueprint([copy.deepcopy(models.encoder), copy.deepcopy(models.predictor)], models.init_rng)


def write_part(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copies this rank's part of `full` into `param`: its local shard for a DTensor (the same
    split as `distribute_tensor`, done locally: every rank drew the same `full`), else all of it."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def _named(module: nn.Module) -> dict[str, torch.Tensor]:
    if next(module.buffers(), None) is not None:
        raise TypeError(f"{type(module).__name__} has buffers: materialize draws parameters only")
    return {canonical_name(n): p for n, p in module.named_parameters()}


@torch.no_grad()
def materialize(models: JEPAModels, plan: Blueprint, device: torch.device) -> None:
    """Gives the (wrapped, sharded) meta `models` storage on `device` and draws their weights:
    the encoder's into the encoder and the target (the target starts as a copy of the encoder),
    the predictor's into the predictor, from `plan`, the `blueprint` taken before wrapping. The
    CPU generator is left where the full build leaves it."""
    for module in (models.encoder, models.predictor, models.target_encoder):
        module.to_empty(device=device)
    if in_fake_mode():  # a rehearsal on fake tensors (pijepa.rehearsal): storage only, nothing to draw
        return
    into = [[_named(models.encoder), _named(models.target_encoder)], [_named(models.predictor)]]
    missing = [{*into[0][0]}, {*into[1][0]}]
    torch.set_rng_state(plan.init_rng)
    for index, name, full in draw_weights(plan.models):
        for params in into[index]:
            write_part(params[name], full)
        missing[index].discard(name)
    if missing[0] or missing[1]:
        raise RuntimeError(f"parameters left undrawn: {sorted(missing[0] | missing[1])[:5]}")
