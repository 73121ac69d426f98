"""Helpers for the crash / preemption tests: start a real training process, wait for a point in
its progress (a logged step, a save in flight), then kill or signal it."""

from __future__ import annotations

import contextlib
import csv
import signal
import subprocess
import time
from pathlib import Path

import torch

from tests.conftest import REPO, TINY_OVERRIDES, launch_env

# log_freq 1: the CSV shows every step, so a test can wait for one; saves every 2 steps: a kill
# during a save is easy to hit.
KILL_SETS = [*TINY_OVERRIDES, "logging.log_freq=1", "logging.checkpoint_freq=2", "logging.keep_checkpoints=3",
             "logging.tensorboard=false", "optimization.max_steps=24"]


def train_args(run_dir: Path, sets: list[str]) -> list[str]:
    args = ["-m", "pijepa", "train", "--config", str(REPO / "configs/cpu_default.yaml")]
    for s in [*KILL_SETS, f"logging.folder={run_dir}", *sets]:
        args += ["--set", s]
    return args


def clean_env(threads: int = 2, slow_saves: bool = False) -> dict:
    # slow_saves: a checkpoint stays written-but-not-renamed for 0.5 s, so a kill can land there.
    return launch_env(threads, PIJEPA_TEST_SAVE_DELAY_S="0.5" if slow_saves else "0")


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    """A training process in its own session, so that a kill reaches torchrun and its workers."""
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]
    return max(steps, default=0)


def saving(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())


def wait_until(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """Polls `ready()` every millisecond; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("the training process did not reach the expected point")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str, str]:
    """Signals the process and everything below it (torchrun starts its workers in sessions of
    their own, so a process group does not reach them): a node that dies takes all of them."""
    import psutil  # a DeepSpeed dependency, installed with the dev extras

    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def assert_same_weights(a: dict, b: dict, parts=("encoder", "predictor", "target_encoder")) -> None:
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below `folder`: what 'untouched' is checked against."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}

