"""A rank that stops mid-run (SIGSTOP) does not hold the others forever: 2 FSDP ranks under torchrun
(gloo, CPU); rank 1 is stopped; rank 0 waits in its next collective until `dist.step_timeout_s`,
writes its Python stacks to RUN/hang/rank0.txt, says in one line which phase stalled and exits with
the watchdog's code; a rerun resumes from `latest`."""

import signal
import sys
import time

import pytest

from pijepa.runtime.watchdog import HUNG_EXIT_CODE
from tests.conftest import free_port
from tests.reliability import clean_env, finish, kill, logged_step, start, train_args, wait_until

STEP_TIMEOUT_S = 8
SLACK_S = 15  # the watchdog polls every second; the stacks and the line take well under one
_PORTS = iter(range(29980, 29985))  # this file's share of the machine's ports


def launch(run_dir, *sets):
    port = free_port(_PORTS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           *train_args(run_dir, ["dist.strategy=fsdp", f"dist.step_timeout_s={STEP_TIMEOUT_S}",
                                 "dist.timeout_s=300", *sets])[1:]]
    return start(cmd, clean_env(threads=1))


def workers(proc) -> dict[int, "psutil.Process"]:  # noqa: F821
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None and "pijepa" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


@pytest.mark.dist
def test_a_stopped_rank_ends_the_others_with_their_stacks(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, "optimization.max_steps=100000", "optimization.epochs=1000")
    assert wait_until(proc, lambda: (run / "checkpoints" / "latest").is_file() and logged_step(run) >= 5)
    ranks = workers(proc)
    assert set(ranks) == {0, 1}
    ranks[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    stack_file = run / "hang" / "rank0.txt"
    try:
        ranks[0].wait(timeout=STEP_TIMEOUT_S + SLACK_S)
        took = time.monotonic() - stopped
    finally:
        ranks[1].send_signal(signal.SIGCONT)
        code, _, err = kill(proc) if proc.poll() is None else finish(proc)
    assert STEP_TIMEOUT_S <= took <= STEP_TIMEOUT_S + SLACK_S, took
    assert code != 0
    line = next(x for x in err.splitlines() if "stalled in phase" in x)
    assert line.startswith("pijepa: error: rank 0: step ") and f"exiting with code {HUNG_EXIT_CODE}" in line, line
    stacks = stack_file.read_text()
    assert "stalled in phase" in stacks and 'File "' in stacks and "Thread" in stacks

    resumed_at = logged_step(run)
    code, _, err = finish(launch(run, f"optimization.max_steps={resumed_at + 2}"))
    assert code == 0, err[-3000:]
    assert "resumed from" in err and logged_step(run) == resumed_at + 2
