"""Run-folder checkpoints: `checkpoints/step_XXXXXXXX/`, written atomically, newest K kept.

A checkpoint is first written to `step_XXXXXXXX.tmp/` (by every rank, in whatever form the
strategy uses) and renamed by rank 0 once all ranks are done, so an interrupted save never
replaces a good checkpoint; `latest` names the newest complete one. A strategy may save
asynchronously (its `save` returns a handle): the trainer calls `poll()` at every step, which
completes the checkpoint (rename, `latest`, pruning) at the first step boundary where every rank's
handle is done; at the latest, the next save or `wait()` (before exiting) completes it.

On resume, rank 0 alone looks at the folder and tells the other ranks what it found (on a shared
filesystem another node's listing may be stale). A `.tmp` folder that the strategy recognises as a
finished save (FSDP: DCP's `.metadata`, written last and atomically) is completed, as if the run
had lived to rename it; other `.tmp` folders (interrupted saves) are reported and removed. Then
the newest complete checkpoint that loads is used: one that does not (a truncated or corrupt file,
a pickle that `weights_only` loading refuses) is reported and renamed `step_XXXXXXXX.unreadable`,
and the one before it is tried. A checkpoint that loads but belongs to another architecture or
strategy (a CheckpointError from the strategy) stops the run instead: that is a configuration
mistake. The folder names and their listing are pijepa.parallel.formats' (export reads the same
folders).
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from pijepa.models.loading import describe_load_error
from pijepa.parallel.base import Strategy
from pijepa.parallel.formats import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    finished_dir,
    step_dir_name,
    step_folders,
    unfinished_dir,
    unfinished_step_folders,
)
from pijepa.runtime.atomic import atomic_write_text
from pijepa.runtime.errors import CheckpointError, CheckpointWriteError, UserError, write_error
from pijepa.runtime.log import warn

# A strategy's load raises a CheckpointError for a checkpoint it cannot use (another architecture,
# strategy or format): the run stops, the user decides. A damaged file raises whatever torch.load,
# DCP or DeepSpeed raise on it (RuntimeError for a truncated zip, UnpicklingError for a refused
# pickle, KeyError / EOFError / OSError for garbage, ...): resume() sets that checkpoint aside and
# tries the one before. A plain ValueError that is not a CheckpointError comes from a bug in the
# loading code: it keeps its traceback and stops the run, as a ValueError always did here. Taking it
# for "unreadable" instead would set aside every good checkpoint in turn and silently restart the
# run from step 0.
_BUG_ERRORS = (ValueError,)
# Tests set this to make "killed while a checkpoint is being written" a point they can hit.
_SAVE_DELAY_S = float(os.environ.get("PIJEPA_TEST_SAVE_DELAY_S", "0"))


GiB = 2**30


def size_text(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rng_state() -> dict[str, Any]:
    # numpy's key becomes a tensor so that the checkpoint loads with weights_only=True.
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, strategy: Strategy, keep: int):
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.strategy, self.keep = strategy, keep
        self._pending: tuple[Any, Path, Path] | None = None  # (handle, tmp, final) of an async save

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (this rank's listing)."""
        return step_folders(self.root)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        self.wait()  # one save in flight at most
        final = self.root / step_dir_name(step)
        tmp = unfinished_dir(final)
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        try:
            handle = self.strategy.save(tmp, extra)
        except Exception as e:
            self._write_failed(tmp, e)
        self._pending = (handle, tmp, final)
        if _SAVE_DELAY_S:  # fault injection for the crash tests: widen the written-not-renamed window
            time.sleep(_SAVE_DELAY_S)
        if self._pending[0] is None:  # written synchronously: complete it now
            self.wait()
        return final

    def poll(self) -> None:
        """Completes an asynchronous save in flight once every rank's part is written; called by
        every rank at every step boundary. Saves happen at the same steps on every rank, so all
        ranks agree whether one is in flight; whether it is done is then agreed by one all-reduce
        (only while a save is in flight), so that all ranks complete it at the same step."""
        if self._pending is None:
            return
        handle = self._pending[0]
        if not self.strategy.any_rank(handle is not None and not handle.done()):
            self.wait()

    def wait(self) -> None:
        """Completes the save in flight, if any: waits for this rank's writes, then (once every
        rank is done) renames the folder, updates `latest` and prunes old checkpoints."""
        if self._pending is None:
            return
        (handle, tmp, final), self._pending = self._pending, None
        if handle is not None:
            try:
                handle.result()
            except Exception as e:
                self._write_failed(tmp, e)
        self.strategy.barrier()
        if self.strategy.is_main:
            self._finish(tmp, final)
        self.strategy.barrier()

    def _finish(self, tmp: Path, final: Path) -> None:
        """Rank 0: the written folder `tmp` becomes the checkpoint `final`."""
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        tmp.rename(final)  # a folder: renamed as a whole, never rewritten (see the module docstring)
        atomic_write_text(self.root / LATEST_FILE, self.complete()[-1].name + "\n")
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        size, free = folder_bytes(final), shutil.disk_usage(self.root).free
        if free < size:  # the next save would fill the disk before the oldest one is pruned
            warn(f"{final}: {size_text(size)} written, {size_text(free)} left on its file system: not "
                 f"enough for the next checkpoint; free space or lower logging.keep_checkpoints")

    def _write_failed(self, tmp: Path, error: Exception) -> NoReturn:
        """A failed write (a full disk, a quota, an I/O error) ends the run in one line, on every
        rank; rank 0 removes the partial `.tmp` at once, so that the disk is usable again, and names
        the checkpoint to resume from. Any other error keeps its traceback."""
        failure = write_error(error) or (error if isinstance(error, CheckpointWriteError) else None)
        if failure is None:
            raise error
        # The failed writer's frames hold its open file: freed with them, the partial file's space is.
        error.__traceback__ = failure.__traceback__ = None
        gc.collect()
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(self.root).free
        latest = self.latest()
        reason = f"{type(failure).__name__}: {str(failure).splitlines()[0][:300]}"
        if isinstance(failure, RuntimeError):  # torch's zip writer says it without an errno
            reason += ": the write stopped short (no space left, or an I/O error)"
        raise CheckpointWriteError(
            f"{self.root}: writing checkpoint {tmp.name.removesuffix('.tmp')} failed ({reason}); "
            f"{size_text(free)} free on its file system; the partial {tmp.name} is removed; the last "
            f"good checkpoint is {latest or 'none'}: free space, then rerun the same command to resume "
            f"{'from it' if latest else 'from the start'}") from None

    def load(self, folder: Path) -> dict[str, Any]:
        """Loads one given checkpoint (meta.read_checkpoint); a checkpoint that cannot be used is a
        CheckpointError (one line from the CLI)."""
        if not Path(folder).is_dir():
            what = "a file" if Path(folder).exists() else "no such folder"
            raise CheckpointError(f"{folder}: {what}; meta.read_checkpoint names a checkpoint folder "
                                  f"(a step_XXXXXXXX folder of a run's {CHECKPOINTS_DIR}/)")
        try:
            extra = self.strategy.load(folder)
        except UserError:
            raise
        except _BUG_ERRORS:
            raise  # a bug keeps its traceback (see _BUG_ERRORS)
        except Exception as e:  # truncated, corrupt, or refused by weights_only loading
            raise CheckpointError(f"{folder}: not a readable checkpoint ({describe_load_error(e)})") from None
        set_rng_state(extra["rng"])
        return extra

    def resume(self) -> tuple[Path, dict[str, Any]] | None:
        """Loads the newest complete checkpoint that is readable on every rank; None if none is.
        The candidates are rank 0's (see `_candidates`): every rank tries the same folders."""
        for name in reversed(self._candidates()):
            folder = self.root / name
            error: Exception | None = None
            try:
                extra = self.strategy.load(folder)
            except UserError:
                raise  # another architecture / strategy (CheckpointError): the user has to decide, not us
            except _BUG_ERRORS:
                raise  # a bug keeps its traceback (see _BUG_ERRORS)
            except Exception as e:  # truncated, corrupt, or refused by weights_only loading
                error = e
            if not self.strategy.any_rank(error is not None):
                set_rng_state(extra["rng"])
                return folder, extra
            self._quarantine(folder, error)
        return None

    def _candidates(self) -> list[str]:
        """Rank 0 settles the unfinished saves and lists the complete checkpoints; every rank gets
        rank 0's list (the broadcast also holds the others until rank 0 is done with the folder)."""
        names = None
        if self.strategy.is_main:
            self._settle_unfinished()
            names = [p.name for p in self.complete()]
        return self.strategy.broadcast_object(names)

    def _settle_unfinished(self) -> None:
        """Rank 0: completes `.tmp` folders holding a finished save (the run died before renaming
        it: an async save between its end and the next step, or a crash just before the rename)
        and removes the others (interrupted saves)."""
        for tmp in unfinished_step_folders(self.root):
            if self.strategy.finished_save(tmp):
                warn(f"completing checkpoint {tmp}: its save had finished on every rank, the run stopped "
                     f"before renaming it")
                self._finish(tmp, finished_dir(tmp))
            else:
                warn(f"removing incomplete checkpoint {tmp} (its save was interrupted)")
                shutil.rmtree(tmp, ignore_errors=True)

    def _quarantine(self, folder: Path, error: Exception | None) -> None:
        """Moves an unreadable checkpoint aside (kept for inspection, never resumed from again)."""
        self.strategy.barrier()
        if self.strategy.is_main:
            aside = folder.with_name(folder.name + ".unreadable")
            n = 1
            while aside.exists():
                aside, n = folder.with_name(f"{folder.name}.unreadable{n}"), n + 1
            folder.rename(aside)
            why = describe_load_error(error) if error else "unreadable on another rank"
            warn(f"checkpoint {folder} is unreadable ({why}); moved to {aside.name}, trying the previous one")
        self.strategy.barrier()
