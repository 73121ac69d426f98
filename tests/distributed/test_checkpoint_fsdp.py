"""FSDP checkpoints at the edges a cluster reaches and a clean CPU run does not, as real torchrun
runs (2 gloo ranks, CPU, fp32) of the tiny config:

- an asynchronous save that finished but was never renamed (the run was killed right after
  `async_save` returned) is completed on resume and resumed from, bit for bit;
- rank 0 alone chooses the checkpoint to resume: a rank whose directory listing is stale (as an NFS
  client's can be right after another node wrote a folder) still loads rank 0's choice;
- `hybrid` sharding takes the ranks per node from whichever launcher set them, and refuses in one
  line when none did.

Run as a module (`python -m tests.distributed.test_checkpoint_fsdp train ...`), this file is one
rank of the stale-listing test: see `_rank_with_stale_listing`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pijepa.parallel.formats import finished_dir
from pijepa.parallel.fsdp import LOCAL_SIZE_VARS, hybrid_shard_size, ranks_per_node, read_full_state
from pijepa.runtime.errors import ConfigError, LaunchError
from tests.conftest import REPO, free_port, launch_env
from tests.reliability import assert_same_weights, kill, start, train_args, wait_until

STEPS, FREQ = 12, 4  # checkpoints at 4, 8, 12 (KILL_SETS keeps 3)
SETS = [f"optimization.max_steps={STEPS}", f"logging.checkpoint_freq={FREQ}", "dist.strategy=fsdp",
        "dist.async_checkpoint=true"]
_PORTS = iter(range(29850, 29880))  # this file's rendezvous ports
STALE_ENV = "PIJEPA_TEST_STALE_LISTING"  # folder names that rank 1's listing of checkpoints/ misses


def torchrun(run_dir: Path, *sets: str, entry: tuple[str, ...] = ("-m", "pijepa"), env: dict | None = None):
    """A started 2-rank torchrun of `pijepa train` (or of `entry` with the same arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port(_PORTS)), *entry,
           *train_args(run_dir, [*SETS, *sets])[2:]]  # from `train`
    return start(cmd, {**launch_env(1), **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    """Waits for a run; a run that hangs (ranks out of step) is killed and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _, out, err = kill(proc)
        pytest.fail(f"the run hung for {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run with asynchronous saves."""
    run = tmp_path_factory.mktemp("reference")
    code, out, err = finish(torchrun(run))
    assert code == 0, f"{out[-2000:]}\n{err[-4000:]}"
    return run


# ---------------------------------------------------------------- 4. async saves are durable once written


def finished_not_renamed(run_dir: Path) -> Path | None:
    """A `.tmp` folder whose DCP `.metadata` is written (every rank's shards are) and not yet renamed."""
    root = run_dir / "checkpoints"
    for tmp in sorted(root.glob("step_*.tmp")) if root.is_dir() else ():
        if (tmp / ".metadata").is_file() and not finished_dir(tmp).exists():
            return tmp
    return None


@pytest.mark.dist
@pytest.mark.slow
def test_async_save_killed_before_its_rename_is_resumed(reference, tmp_path):
    run = tmp_path / "run"
    # The save delay holds the Checkpointer for 2 s right after async_save returned (the files
    # are written in the background meanwhile): SIGKILL lands in that window.
    proc = torchrun(run, env={"PIJEPA_TEST_SAVE_DELAY_S": "2"})
    assert wait_until(proc, lambda: finished_not_renamed(run) is not None), "never saw a written async save"
    kill(proc)
    tmp = finished_not_renamed(run)
    assert tmp is not None, "the save was renamed before the kill: nothing was tested"
    step = int(finished_dir(tmp).name[5:])

    code, out, err = finish(torchrun(run))
    assert code == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert f"completing checkpoint {tmp}" in err, err[-4000:]
    assert f"resumed from {checkpoint(run, step)} at step {step}" in err, err[-4000:]
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert_same_weights(read_full_state(checkpoint(run, STEPS)), read_full_state(checkpoint(reference, STEPS)))


# ---------------------------------------------------------------- 5. rank 0 chooses the checkpoint


def _rank_with_stale_listing(argv: list[str]) -> int:
    """One rank of the test below. On rank 1, listing the run's checkpoints/ misses the folders
    named in STALE_ENV, as a stale directory cache does; opening them by path still works, as it
    does there. Each rank prints the checkpoint that its Checkpointer resumed from."""
    import pathlib

    from pijepa.cli import main
    from pijepa.train.checkpoint import Checkpointer

    hidden, rank = set(os.environ[STALE_ENV].split(",")), os.environ["RANK"]
    iterdir, resume = pathlib.Path.iterdir, Checkpointer.resume

    def stale_iterdir(self):
        return (p for p in iterdir(self) if not (self.name == "checkpoints" and p.name in hidden))

    def reporting_resume(self):
        found = resume(self)
        print(f"rank {rank} resumed from {found[0].name if found else None}", flush=True)
        return found

    if rank == "1":
        pathlib.Path.iterdir = stale_iterdir
    Checkpointer.resume = reporting_resume
    return main(argv)


@pytest.mark.dist
@pytest.mark.slow
def test_every_rank_resumes_rank_0s_choice(reference, tmp_path):
    run = tmp_path / "run"
    for step in (4, 8):
        shutil.copytree(checkpoint(reference, step), checkpoint(run, step))
    proc = torchrun(run, entry=("-m", "tests.distributed.test_checkpoint_fsdp"),
                    env={STALE_ENV: checkpoint(run, 8).name})
    code, out, err = finish(proc)
    assert code == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert "rank 0 resumed from step_00000008" in out and "rank 1 resumed from step_00000008" in out, out
    assert_same_weights(read_full_state(checkpoint(run, STEPS)), read_full_state(checkpoint(reference, STEPS)))


# ---------------------------------------------------------------- 8. hybrid: the launcher's ranks per node


def test_ranks_per_node_by_launcher():
    assert ranks_per_node({"LOCAL_WORLD_SIZE": "8", "LOCAL_SIZE": "4"}) == (8, "LOCAL_WORLD_SIZE")  # torchrun
    assert ranks_per_node({"LOCAL_SIZE": "4", "SLURM_NTASKS_PER_NODE": "1"}) == (4, "LOCAL_SIZE")  # deepspeed
    assert ranks_per_node({"SLURM_NTASKS_PER_NODE": "2"}) == (2, "SLURM_NTASKS_PER_NODE")  # srun, a task a rank
    assert ranks_per_node({}) is None
    with pytest.raises(LaunchError, match=r"^LOCAL_SIZE='8\(x2\)': expected the number of ranks on this node"):
        ranks_per_node({"LOCAL_SIZE": "8(x2)"})
    assert hybrid_shard_size(2, 8, {"LOCAL_WORLD_SIZE": "4"}) == (2, "dist.hybrid_shard_size")
    assert hybrid_shard_size(0, 8, {"LOCAL_SIZE": "4"}) == (4, "LOCAL_SIZE")
    with pytest.raises(LaunchError, match="the launcher set none of LOCAL_WORLD_SIZE, LOCAL_SIZE"):
        hybrid_shard_size(0, 8, {})
    with pytest.raises(ConfigError, match=r"dist.hybrid_shard_size 3 \(from LOCAL_SIZE\) must divide the world size 8"):
        hybrid_shard_size(0, 8, {"LOCAL_SIZE": "3"})


def test_hybrid_without_a_local_size_is_one_clear_line(tmp_path):
    """A launch that sets RANK and WORLD_SIZE but no ranks per node: refused before the process
    group starts, in one line, with nothing written."""
    run = tmp_path / "run"
    env = {k: v for k, v in launch_env(1).items() if k not in LOCAL_SIZE_VARS}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    r = subprocess.run([sys.executable, *train_args(run, [*SETS, "dist.fsdp_sharding=hybrid"])], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("pijepa train: error: dist.fsdp_sharding hybrid with dist.hybrid_shard_size 0 "
                               "shards within a node, but the launcher set none of LOCAL_WORLD_SIZE"), r.stderr
    assert not run.exists()


@pytest.mark.dist
@pytest.mark.slow
def test_hybrid_takes_the_deepspeed_launchers_local_size(tmp_path):
    """Ranks started with DeepSpeed's launcher's variable (LOCAL_SIZE) instead of torchrun's: one
    rank per node makes a (2 replicas x 1) mesh, not one shard group over both ranks."""
    run = tmp_path / "run"
    entry = ("--no-python", "env", "-u", "LOCAL_WORLD_SIZE", "LOCAL_SIZE=1", sys.executable, "-m", "pijepa")
    code, out, err = finish(torchrun(run, "optimization.max_steps=2", "dist.fsdp_sharding=hybrid", entry=entry))
    assert code == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert "FSDP hybrid: 2 replica group(s) x 1 rank(s) per shard group (from LOCAL_SIZE)" in err, err[-4000:]
    assert (checkpoint(run, 2) / ".metadata").is_file()


if __name__ == "__main__":
    sys.exit(_rank_with_stale_listing(sys.argv[1:]))
