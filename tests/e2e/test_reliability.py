"""Crashes, preemption and divergence of real single-process training runs (CLI, fp32 CPU)."""

import random
import signal
import sys
import time

import pytest
import torch

from pijepa.runtime.signals import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE
from tests.reliability import (
    assert_same_weights,
    clean_env,
    finish,
    kill,
    logged_step,
    saving,
    start,
    train_args,
    wait_until,
)

STEPS = 24


def final_state(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:08d}"
    return torch.load(run_dir / "checkpoints" / latest / "state.pt", weights_only=True)


def launch(run_dir, *sets, slow_saves=False):
    return start([sys.executable, *train_args(run_dir, list(sets))], clean_env(slow_saves=slow_saves))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    code, _, err = finish(launch(run))
    assert code == 0, err[-3000:]
    return final_state(run)


@pytest.mark.slow
def test_sigkill_at_random_points_and_during_a_save_resumes_to_the_same_parameters(reference, tmp_path):
    run, rng = tmp_path / "run", random.Random(0)
    # 1) killed at a random step, 2) killed while a checkpoint is being written, 3) killed at a
    # random moment after another random step; then the run is restarted until it finishes.
    proc = launch(run)
    assert wait_until(proc, lambda: logged_step(run) >= rng.randint(3, 8))
    assert kill(proc)[0] == -signal.SIGKILL

    proc = launch(run, slow_saves=True)
    assert wait_until(proc, lambda: saving(run) and logged_step(run) >= 10), "never saw a save in flight"
    assert kill(proc)[0] == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())

    proc = launch(run)
    target = rng.randint(14, 18)
    assert wait_until(proc, lambda: logged_step(run) >= target)
    time.sleep(rng.uniform(0.0, 0.1))
    assert kill(proc)[0] == -signal.SIGKILL

    code, _, err = finish(launch(run))
    assert code == 0, err[-3000:]
    assert "resumed from" in err
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
    assert_same_weights(final_state(run), reference)


@pytest.mark.slow
def test_sigterm_saves_within_one_step_exits_75_and_resumes_identically(reference, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, "logging.checkpoint_freq=100")  # only the preemption and the final step save
    assert wait_until(proc, lambda: logged_step(run) >= 7)
    seen = logged_step(run)
    code, _, err = kill(proc, signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) == 1 and seen <= int(saved[0][5:]) <= seen + 2, (seen, saved)
    assert f"preempted (SIGTERM): saved step {int(saved[0][5:])}" in err
    assert "Traceback" not in err

    code, _, err = finish(launch(run, "logging.checkpoint_freq=100"))
    assert code == 0, err[-3000:]
    assert f"at step {int(saved[0][5:])}" in err
    assert_same_weights(final_state(run), reference)


@pytest.mark.slow
def test_divergence_skips_counts_and_stops_naming_the_last_good_checkpoint(tmp_path):
    """A real divergence: an absurd learning rate drives the loss to inf/nan within a few steps."""
    run = tmp_path / "run"
    code, out, err = finish(launch(run, "optimization.lr=1e30", "optimization.start_lr=1e30",
                                   "optimization.max_nonfinite_steps=3", "logging.checkpoint_freq=1"))
    assert code == NONFINITE_EXIT_CODE, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "not finite for 3 steps in a row" in last and "loss=" in last, last
    assert "Last good checkpoint:" in last and "Traceback" not in err
    assert err.count("step skipped") == 2
    named = last.split("Last good checkpoint: ")[1].strip()
    # Nothing non-finite was ever saved: every checkpoint left behind loads and is finite.
    for folder in (run / "checkpoints").glob("step_*"):
        state = torch.load(folder / "state.pt", weights_only=True)
        for part in ("encoder", "predictor", "target_encoder"):
            assert all(torch.isfinite(v).all() for v in state[part].values()), folder
    assert named.endswith(sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1])
