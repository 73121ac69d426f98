"""2 FSDP ranks under torchrun (gloo, CPU, fp32): killed with SIGKILL at random points (one of them
while a sharded checkpoint is being written) and preempted with SIGTERM, then restarted: the final
parameters equal an uninterrupted 2-rank run's."""

import itertools
import random
import signal
import sys
import time

import pytest

from pijepa.parallel.fsdp import read_full_state
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
_PORTS = itertools.count(29680)  # 29680-29699 belong to this file


def launch(run_dir, *sets, slow_saves=False):
    port = next(_PORTS)
    assert port < 29700
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           *train_args(run_dir, ["dist.strategy=fsdp", *sets])[1:]]
    return start(cmd, clean_env(threads=1, slow_saves=slow_saves))


def final_state(run_dir):
    return read_full_state(run_dir / "checkpoints" / f"step_{STEPS:08d}")


@pytest.mark.dist
@pytest.mark.slow
def test_two_fsdp_ranks_survive_sigkill_and_sigterm(tmp_path):
    reference = tmp_path / "reference"
    code, _, err = finish(launch(reference))
    assert code == 0, err[-4000:]

    run, rng = tmp_path / "run", random.Random(1)
    proc = launch(run)
    assert wait_until(proc, lambda: logged_step(run) >= rng.randint(3, 7))
    time.sleep(rng.uniform(0.0, 0.1))
    kill(proc)

    proc = launch(run, slow_saves=True)
    assert wait_until(proc, lambda: saving(run) and logged_step(run) >= 9), "never saw a save in flight"
    kill(proc)

    # SIGTERM to torchrun only: it forwards the signal, both ranks finish the step and save.
    proc = launch(run, "logging.checkpoint_freq=100")
    assert wait_until(proc, lambda: logged_step(run) >= 15)
    seen = logged_step(run)
    proc.send_signal(signal.SIGTERM)
    _, _, err = finish(proc)
    assert "preempted (SIGTERM)" in err, err[-4000:]
    saved = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    assert seen <= saved <= seen + 2, (seen, saved)

    code, _, err = finish(launch(run))
    assert code == 0, err[-4000:]
    assert f"at step {saved}" in err
    assert_same_weights(final_state(run), final_state(reference))
