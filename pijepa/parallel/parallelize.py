"""Model transformations for sharded training, one small function per concern.

Applied in one fixed order, as torchtitan does: activation checkpointing -> compile -> FSDP.
  - AC first, so that the checkpointed region is exactly one transformer block and the compiled
    graph contains the recomputation;
  - compile before FSDP, so that FSDP's hooks sit outside the compiled block (on the wrapper) and
    the all-gather / reduce-scatter stay plain eager collectives;
  - FSDP last, per block and then at the root, because fully_shard groups the parameters not
    already claimed by a wrapped submodule (bottom-up).

Every function works on any module that holds its transformer blocks in an `nn.ModuleList` named
`blocks` (encoder) or `predictor_blocks` (predictor), so other strategies can reuse them:
`prepare_blocks` is AC -> compile for the engines that wrap whole models afterwards (DDP,
DeepSpeed), where FSDP's hook placement does not apply and parameter names must stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pijepa.runtime.errors import ConfigError

BLOCK_LISTS = ("blocks", "predictor_blocks")

# Name components added by the wrappers above (and FSDP1); canonical names drop them.
_WRAPPER_PARTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TypeError(f"{type(model).__name__} has no transformer blocks ({' or '.join(BLOCK_LISTS)})")


def canonical_name(name: str) -> str:
    """`blocks.0._checkpoint_wrapped_module.attn.qkv.weight` -> `blocks.0.attn.qkv.weight`."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> int:
    """Activation checkpointing per transformer block: `none`, `full` (every block) or `selective`
    (every `every`-th block: the 2nd, 4th, ... for every=2), trading recomputation for memory.
    Returns the number of wrapped blocks."""
    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ConfigError(f"dist.activation_checkpointing {mode!r}: expected none, full or selective")
    step = 1 if mode == "full" else max(1, every)
    blocks = transformer_blocks(model)
    wrapped = 0
    for i, block in enumerate(blocks):
        if (i + 1) % step == 0:
            # Non-reentrant: works with FSDP's hooks and with inputs that do not require grad.
            # No RNG state is kept: the blocks have no dropout, so recomputation is deterministic.
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                           preserve_rng_state=False)
            wrapped += 1
    return wrapped


def apply_compile(model: nn.Module, in_place: bool = False) -> None:
    """torch.compile each transformer block: the blocks are identical, so one compiled graph is
    reused by all of them, and compiling per block keeps FSDP's per-block collectives eager.

    `in_place` compiles each block's call with `nn.Module.compile` instead of wrapping it in an
    OptimizedModule: parameter and state-dict names stay as they are (no `_orig_mod.`), which
    engines that name their optimizer state and checkpoints by parameter name need (DeepSpeed,
    DDP's state.pt). The block's own hooks are then inside the compiled call, so it suits engines
    that put no hooks on the blocks (DDP and ZeRO-1/2 hook the parameters' gradients)."""
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        if in_place:
            block.compile()
        else:
            # torch.compile of a module returns a module (OptimizedModule); its stub says "a callable".
            blocks[i] = cast(nn.Module, torch.compile(block))


def prepare_blocks(trainable: Iterable[nn.Module], target: nn.Module | None, ac: str, ac_every: int,
                   compile_blocks: bool) -> int:
    """`dist.activation_checkpointing` and `dist.compile` for an engine that wraps the models after
    this (DDP, DeepSpeed), in FSDP's order: AC on the trained models' blocks (the target runs
    no-grad forwards only: nothing to checkpoint), then compile, in place, of every model's blocks.
    Returns the number of checkpointed blocks."""
    trainable = list(trainable)
    wrapped = sum(apply_ac(m, ac, ac_every) for m in trainable)
    if compile_blocks:
        for m in [*trainable, *([target] if target is not None else [])]:
            apply_compile(m, in_place=True)
    return wrapped


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
               reshard_after_forward: bool, reshard_root: bool | None = None) -> nn.Module:
    """fully_shard each transformer block, then the root (patch embedding, norms, projections).

    `reshard_after_forward` True frees each block's gathered parameters after its forward and
    gathers them again in backward (ZeRO-3 like); False keeps them until backward (ZeRO-2 like).
    `reshard_root` None lets FSDP decide for the root (kept unsharded: backward needs it first);
    a model that only runs no-grad forwards must pass True, or its gathered parameters would stay
    registered after the forward and hide in-place updates of the shards (the EMA target).
    A 2-D mesh (replicate, shard) gives HSDP.
    """
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_root)
    return model
