"""Resuming a DeepSpeed checkpoint at another world size, through DeepSpeed's universal checkpoint.

ZeRO saves each rank's flat partitions (fp32 master weights and AdamW's exp_avg / exp_avg_sq, per
param group), cut for the world size that wrote them, and DeepSpeed's own loader refuses another
one. Its universal checkpoint is the way across: `deepspeed.checkpoint.ds_to_universal` merges the
partitions into one folder per parameter (`zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt` and,
ZeRO-1/2, `step.pt`; ZeRO-3 keeps the step in `zero/optimizer_state.pt`), and an engine whose
config says `checkpoint.load_universal` cuts its own partitions out of them, at any world size.
Measured on DeepSpeed 0.19.8 (CPU, gloo): ZeRO-1/2/3, fp32 and bf16 (BF16_Optimizer included).

1. Rank 0 converts `<step>/ds/` into `<step>.universal/ds/`, next to the checkpoint: on the
   filesystem that every rank wrote the checkpoint to, so every rank reads it. The conversion runs
   in this process (no worker pool: the ranks' CUDA contexts are not forked) and reads the engine
   files as resuming at the same world size does (DeepSpeed unpickles them itself). Every rank is
   told the outcome before anyone goes on, so a failed conversion fails on every rank alike: a file
   that cannot be read is an unreadable checkpoint (the Checkpointer sets it aside), anything else
   a CheckpointError (one line; the run stops).
2. Every rank loads it with the engine's universal loader. `load_universal` is read only inside
   `load_checkpoint`, so it is switched on for that call alone. The param groups' settings are
   restored afterwards: ZeRO-3's universal loader copies group 0's onto every group, which would
   give the no-decay group `wd_exclude: False` (lr and weight decay are set before every step
   anyway); and it hands every partition one shared AdamW `step` tensor, which is copied apart.
3. Rank 0 removes `<step>.universal/` once every rank has loaded (a leftover of an interrupted
   resume is replaced by the next conversion; the Checkpointer lists only `step_XXXXXXXX` folders).

What comes back: the fp32 master weights (the bf16 / module copies are refreshed from them), AdamW's
moments and step, the engine's step counters. The frozen parameters (the sin-cos positional tables)
have no optimizer state, and the universal loader leaves the module's, which the model constructor
builds the same. The EMA target (full, in `ds_state.pt`) and `extra` are read by the strategy as at
the same world size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from pijepa.models.loading import describe_load_error
from pijepa.parallel.base import Strategy
from pijepa.parallel.deepspeed_checkpoint import TAG
from pijepa.runtime.errors import CheckpointError
from pijepa.runtime.log import warn

UNIVERSAL_SUFFIX = ".universal"
# What reading a damaged checkpoint raises (a truncated zip, a missing rank file, a broken pickle).
_UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError)


def universal_dir(folder: Path) -> Path:
    """Where the universal form of the checkpoint `folder` is written while it is being loaded."""
    return Path(folder).with_name(Path(folder).name + UNIVERSAL_SUFFIX)


def convert_to_universal(folder: Path) -> tuple[str, str] | None:
    """Rank 0: DeepSpeed's ds_to_universal of `folder/ds/` into `universal_dir(folder)/ds/`.
    None when it is written, else ("unreadable" | "refused", why)."""
    scratch = universal_dir(folder)
    try:
        shutil.rmtree(scratch, ignore_errors=True)  # left by an interrupted resume
        scratch.mkdir()
    except OSError as e:
        return "refused", f"cannot write {scratch} ({describe_load_error(e)})"
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(Path(folder) / TAG), output_folder=str(scratch / TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # pijepa's models carry no universal-checkpoint info
    try:  # it narrates every step, with progress bars
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    except _UNREADABLE as e:
        return "unreadable", describe_load_error(e)
    except Exception as e:  # an assertion or a layout the converter does not know
        return "refused", describe_load_error(e)
    return None


def load_universal(engine: Any, folder: Path, outcome: tuple[str, str] | None, saved_world: int) -> None:
    """Every rank: loads the universal form of `folder` written by rank 0 (`outcome`: what
    convert_to_universal returned there, broadcast)."""
    if outcome is not None:
        kind, why = outcome
        if kind == "unreadable":
            raise RuntimeError(f"converting it to a universal checkpoint failed: {why}")
        raise CheckpointError(f"{folder}: written by {saved_world} rank(s), and DeepSpeed's universal checkpoint "
                              f"conversion, which resuming on another number of ranks needs, failed: {why}; "
                              f"resume on {saved_world} rank(s)")
    from deepspeed.utils import logger as ds_logger

    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    level = ds_logger.level
    ds_logger.setLevel(max(level, logging.ERROR))  # "MPU is not provided, setting tp size to 1", on every rank
    engine._config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(universal_dir(folder)), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
        ds_logger.setLevel(level)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no universal checkpoint in {universal_dir(folder)}")
    for group, settings in zip(engine.optimizer.param_groups, groups):
        group.update(settings)
    # ZeRO-3's universal loader gives every flat partition the same `step` tensor, which torch's
    # AdamW increments in place: one increment per group and step, a wrong bias correction.
    for state in getattr(getattr(engine.optimizer, "optimizer", None), "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_at_new_world_size(strategy: Strategy, engine: Any, folder: Path, saved_world: int) -> None:
    """Loads the engine state of a checkpoint written by `saved_world` ranks into this run's
    `strategy.world_size` ranks (every rank calls it, in step)."""
    outcome = convert_to_universal(folder) if strategy.is_main else None
    load_universal(engine, folder, strategy.broadcast_object(outcome), saved_world)
    strategy.barrier()  # every rank has read the universal files
    if strategy.is_main:
        shutil.rmtree(universal_dir(folder), ignore_errors=True)
    warn(f"{folder}: written by {saved_world} rank(s), resumed on {strategy.world_size}: the fp32 master weights "
         f"and the AdamW moments and step were re-partitioned through DeepSpeed's universal checkpoint")
