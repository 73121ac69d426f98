"""The SLURM batch script's preemption path, run for real on this machine with the three SLURM
commands it calls replaced by small stand-ins (there is no SLURM here): `srun` runs the step on
this node, `scontrol` names the node and records a requeue, `scancel --signal` signals the step's
processes. SLURM's warning signal (USR1 to the batch shell) must make both FSDP ranks save and stop,
and the script must requeue the job; the requeued job resumes and finishes."""

import os
import signal
import subprocess
import textwrap

import pytest

from tests.conftest import REPO
from tests.reliability import KILL_SETS, finish, logged_step, wait_until

STUBS = {
    # srun [options] command...: run the command once, as node 0 of 1.
    "srun": """
        while [[ "$1" == --* ]]; do shift; done
        export SLURM_NODEID=0 SLURM_NNODES=1
        exec "$@"
    """,
    "scontrol": """
        if [ "$1" = show ]; then echo 127.0.0.1; fi
        if [ "$1" = requeue ]; then echo "$2" >> "$FAKE_SLURM_LOG"; fi
    """,
    # scancel --signal=USR1 JOB: signals every process of the job step (matched by its run folder),
    # not the batch shell (its caller), as SLURM does without --batch.
    "scancel": """
        sig=${1#--signal=}
        for pid in $(pgrep -f "$FAKE_SLURM_MATCH"); do
          if [ "$pid" != "$PPID" ]; then kill "-$sig" "$pid" 2>/dev/null || true; fi
        done
    """,
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        path.chmod(0o755)
    return bin_dir


def sbatch(fake_slurm, run_dir, log, port):
    args = ["bash", str(REPO / "launchers/slurm_torchrun.sbatch"), "--config", str(REPO / "configs/cpu_default.yaml")]
    for s in [*KILL_SETS, "dist.strategy=fsdp", "logging.checkpoint_freq=100", f"logging.folder={run_dir}"]:
        args += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PATH=f"{fake_slurm}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node0",
               SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="2", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               FAKE_SLURM_LOG=str(log), FAKE_SLURM_MATCH=f"logging.folder={run_dir}")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.dist
@pytest.mark.slow
def test_usr1_to_the_batch_script_saves_stops_and_requeues(fake_slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "requeued.txt"
    job = sbatch(fake_slurm, run, log, 29721)
    assert wait_until(job, lambda: logged_step(run) >= 5)
    job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300 reaches the batch shell only
    code, out, err = finish(job)
    assert "preempted (SIGUSR1)" in err, err[-4000:]
    assert "requeueing job 4242" in err
    assert log.read_text().split() == ["4242"]
    saved = [int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
    assert len(saved) == 1 and saved[0] >= 5

    job = sbatch(fake_slurm, run, log, 29722)  # the requeued job
    code, out, err = finish(job)
    assert code == 0, err[-4000:]
    assert f"at step {saved[0]}" in err
    assert (run / "checkpoints" / "step_00000024").is_dir()
    assert log.read_text().split() == ["4242"]  # finished: not requeued again
