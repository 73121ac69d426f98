"""Running the stages of `pijepa reproduce`: timings, OUT/commands.sh, subprocesses for the
pretraining runs, this process for the cheap stages, the random encoder and the --smoke data."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pijepa.runtime.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from pijepa.runtime.errors import UserError
from pijepa.runtime.log import console

if TYPE_CHECKING:
    from pijepa.commands.reproduce.stages import Stage

LOG_TAIL_LINES = 15


def log(msg: str) -> None:
    console(f"{time.strftime('%H:%M:%S')} pijepa reproduce: {msg}")


class Book:
    """Wall times of the stages that ran (OUT/timings.json; kept across reruns)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "timings.json"
        self.timings: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.lock = threading.Lock()

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        log(f"[{name}] ...")
        result = fn()
        with self.lock:  # parallel pretraining runs (--jobs) finish in threads of this process
            self.timings[name] = round(time.perf_counter() - t0, 1)
            log(f"[{name}] done in {self.timings[name]:.1f} s")
            atomic_write_json(self.path, self.timings)
        return result


def write_commands(path: Path, stages: list[Stage]) -> None:
    """OUT/commands.sh: the argv lists the stages run, joined with shlex in the order they run."""
    lines = ["#!/bin/sh", "# The CLI commands of this `pijepa reproduce` run, in the order it runs them",
             "# (each skipped there when its output exists), from the folder it ran in:",
             f"cd {shlex.quote(os.getcwd())}", "set -e", *(stage.script_line() for stage in stages)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_threads(jobs: int) -> int:
    """Torch threads per pretraining run: OMP_NUM_THREADS if set, else the cores shared by the parallel runs."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // max(jobs, 1)))


def _tail(log_file: Path) -> str:
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def run_process(stage: Stage, threads: int, device: str) -> None:
    """`python -m pijepa <argv>` with its output appended to the stage's log."""
    assert stage.argv is not None
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if device == "cpu":  # the trainer takes a visible GPU by itself
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(stage.log, "a") as f:
        f.write(f"$ {stage.script_line()}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "pijepa", *stage.argv], env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"`{stage.script_line()}` failed with exit code {rc}; see {stage.log}:\n"
                           + _tail(stage.log))


@functools.lru_cache(maxsize=1)
def _inline_parser() -> argparse.ArgumentParser:
    """The parsers of the commands run in this process, registered as `pijepa` registers them."""
    from pijepa.commands import evaluate, export

    parser = argparse.ArgumentParser(prog="pijepa")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (export, evaluate):
        module.register(commands)
    return parser


def run_inline(stage: Stage) -> None:
    """`pijepa <argv>` in this process (no interpreter start-up), its output in the stage's log."""
    assert stage.argv is not None
    command = stage.script_line()
    try:
        args = _inline_parser().parse_args(stage.argv)
    except SystemExit as e:  # the argv is built by stages.py: a bad one is a bug there
        raise RuntimeError(f"`{command}`: rejected by its own parser (exit code {e.code})") from None
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    with open(stage.log, "a") as f:
        f.write(f"$ {command}\n")
        f.flush()
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                code = args.run(args)
        except UserError as e:  # bad data or a bad file: still one line, now naming the stage
            raise type(e)(f"`{command}` failed: {e} (log: {stage.log})") from e
    if isinstance(code, int) and code:
        raise RuntimeError(f"`{command}` failed with exit code {code}; see {stage.log}:\n" + _tail(stage.log))


def run_stage(stage: Stage, book: Book, threads: int, device: str) -> None:
    if stage.done():
        return
    if stage.call is not None:
        book.timed(stage.name, stage.call)
    elif stage.process:
        book.timed(stage.name, lambda: run_process(stage, threads, device))
    else:
        book.timed(stage.name, lambda: run_inline(stage))


def run_parallel(stages: list[Stage], book: Book, jobs: int, threads: int, device: str) -> None:
    """`jobs` stages at a time (each a subprocess), in threads of this process."""
    pending = [stage for stage in stages if not stage.done()]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(run_stage, stage, book, threads, device) for stage in pending]:
            future.result()


def save_random_encoder(config: Path, overrides: list[str], out: Path) -> None:
    """The untrained encoder: built exactly as the trainer builds it (same seed, same init)."""
    from pijepa.config import load_config
    from pijepa.parallel.formats import ENCODER_FORMAT, plain_state_dict
    from pijepa.train.build import build_models, model_entry

    cfg = load_config(config, overrides)
    models = build_models(cfg)
    atomic_torch_save(out, {"format": ENCODER_FORMAT,
                            "model": model_entry(cfg),
                            "step": 0,
                            "encoder": plain_state_dict(models.encoder.state_dict()),
                            "target_encoder": plain_state_dict(models.target_encoder.state_dict()),
                            "predictor": plain_state_dict(models.predictor.state_dict())})


def make_smoke_source(src: Path, dst: Path, per_class: int) -> None:
    """The first `per_class` images of every class tar of `src` as a small per-class tar folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for tar_path in sorted(src.glob("*.tar")):
        out = dst / tar_path.name
        if out.is_file():
            continue
        tmp = out.with_name(out.name + ".tmp")
        with tarfile.open(tar_path) as tin, tarfile.open(tmp, "w") as tout:
            n = 0
            for member in tin:
                if not member.isfile():
                    continue
                tout.addfile(member, tin.extractfile(member))
                n += 1
                if n >= per_class:
                    break
        tmp.replace(out)
