"""Crashes restart by themselves: 2 FSDP ranks started by launchers/torchrun_single_node.sh with
MAX_RESTARTS=1 (torchrun's --max-restarts); one rank is SIGKILLed mid-run; torchrun restarts both
from `latest` and the job finishes without a person, its final checkpoint bit-identical to an
uninterrupted run's. The same restart loop, for DeepSpeed's launcher (run_with_restarts), is
checked on its exit-code rules."""

import os
import signal
import subprocess
import textwrap

import pytest

from pijepa.parallel.fsdp import read_full_state
from tests.conftest import REPO, free_port
from tests.reliability import (
    KILL_SETS,
    assert_same_weights,
    clean_env,
    finish,
    logged_step,
    start,
    train_args,
    wait_until,
)

STEPS = 24
_PORTS = iter(range(29985, 29990))  # this file's share of the machine's ports


def launcher(run_dir, restarts: int):
    port = free_port(_PORTS)
    args = train_args(run_dir, ["dist.strategy=fsdp"])[3:]  # after `-m pijepa train`
    env = {**clean_env(threads=1), "MASTER_PORT": str(port), "MAX_RESTARTS": str(restarts)}
    return start([str(REPO / "launchers/torchrun_single_node.sh"), "2", *args], env)


def rank_pid(proc, rank: int):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank) and "pijepa" in " ".join(child.cmdline()):
            return child
    return None


@pytest.mark.dist
@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_ends_as_if_uninterrupted(tmp_path):
    assert f"optimization.max_steps={STEPS}" in KILL_SETS
    reference = tmp_path / "reference"
    code, _, err = finish(launcher(reference, restarts=0))
    assert code == 0, err[-4000:]

    run = tmp_path / "run"
    proc = launcher(run, restarts=1)
    assert wait_until(proc, lambda: logged_step(run) >= 7 and (run / "checkpoints" / "latest").is_file())
    victim = rank_pid(proc, 1)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    code, _, err = finish(proc)
    assert code == 0, err[-4000:]
    assert "resumed from" in err  # the restarted ranks continued from `latest`
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_weights(read_full_state(run / final), read_full_state(reference / final))


def test_deepspeed_restart_loop_retries_failures_but_not_user_errors_or_preemption(tmp_path):
    counter = tmp_path / "count"
    script = textwrap.dedent(f"""\
        set -euo pipefail
        source "{REPO / 'launchers/_common.sh'}"
        MAX_RESTARTS=2
        run_with_restarts bash -c 'n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}
            exit $0' "$1"
        """)
    for code, runs in ((1, 3), (2, 1), (4, 1), (75, 1), (0, 1)):
        counter.unlink(missing_ok=True)
        r = subprocess.run(["bash", "-c", script, "loop", str(code)], capture_output=True, text=True, timeout=60,
                           env={**os.environ})
        assert r.returncode == code and int(counter.read_text()) == runs, (code, r.stderr)
    assert "restart 2 of 2" in subprocess.run(["bash", "-c", script, "loop", "1"], capture_output=True, text=True,
                                              timeout=60).stderr
