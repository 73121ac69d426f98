"""A streaming (webdataset, finite) FSDP run resumed at another world size, through the CLI under
torchrun (gloo, CPU): 2 ranks -> 1 rank -> 2 ranks, each resume continuing from the checkpoint's
step with the readers restarted (pijepa/data/wds/restart.py) and a warning saying so.

100 real CIFAR-10 images in 5 shards of 20; global batch 16 (8 per rank, accumulation 2 on one
rank, so a step is the same 16 samples at either world size); 6 steps per epoch, 3 epochs. The
first run stops at step 4 (64 samples into reader epoch 0), the second at step 11 (it restarted
epoch 0 at step 4 and has read 112 samples since: 12 into reader epoch 1), the third finishes.
A torchrun start costs 10-25 s on 2 cores, so the two directions share one chain of three runs.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, REPO, TINY_OVERRIDES, free_port, launch_env, run_cli, tar_subset

PORTS = range(29930, 29950)  # this file's rendezvous ports
SETS = [*TINY_OVERRIDES, "dist.strategy=fsdp", "data.dataset=webdataset", "data.wds_mode=finite",
        "data.global_batch_size=16", "data.shuffle_buffer=20", "optimization.epochs=3", "logging.log_freq=1",
        "logging.checkpoint_freq=100", "logging.tensorboard=false"]


def torchrun(run_dir: Path, shards: Path, nproc: int, *sets: str) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(REPO / "configs/cpu_default.yaml")]
    for s in [*SETS, f"data.shards={shards}", f"logging.folder={run_dir}", *sets]:
        args += ["--set", s]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port(PORTS)), "-m", "pijepa", *args]
    r = subprocess.run(cmd, cwd=REPO, env=launch_env(2 // nproc), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"torchrun on {nproc} rank(s) failed:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    return r


def latest_state(run_dir: Path) -> dict:
    """The newest FSDP checkpoint's `extra` (step, loader state, ...), written by rank 0."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "extra.pt", weights_only=True)["extra"]


@pytest.mark.dist
@pytest.mark.slow
def test_streaming_fsdp_run_resumes_on_fewer_then_more_ranks(tmp_path):
    src = DATA / "cifar10" / "train"
    if not src.is_dir():
        pytest.skip(f"real image data not found at {src}")
    shards = tmp_path / "shards"
    r = run_cli("shards", "write", "--src", str(tar_subset(src, tmp_path / "src", 10)), "--out", str(shards),
                "--samples-per-shard", "20", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    index = shards / "shards.json"
    run = tmp_path / "run"

    torchrun(run, index, 2, "optimization.max_steps=4")
    assert latest_state(run)["step"] == 4

    fewer = torchrun(run, index, 1, "optimization.max_steps=11")
    assert "at step 4" in fewer.stderr
    assert ("resuming the webdataset loader at step 4 on 1 rank(s) x 1 worker(s) from a checkpoint of 2 x 1: "
            "positions are per reader, so every reader restarts at the start of reader epoch 0 (finite): "
            "64 sample(s) read before the checkpoint are read again and 0" in fewer.stderr)
    assert "global batch makes it" not in fewer.stderr  # the step means the same 16 samples
    state = latest_state(run)
    assert state["step"] == 11 and state["loader"]["world_size"] == 1
    assert state["loader"]["ranks"][0]["micro_batches"] == 22  # accumulation 2
    assert state["loader"]["ranks"][0]["readers"][0]["epoch"] == 1

    more = torchrun(run, index, 2)  # to the end: 3 epochs of 6 steps
    assert "at step 11" in more.stderr
    assert ("at step 11 on 2 rank(s) x 1 worker(s) from a checkpoint of 1 x 1: positions are per reader, so "
            "every reader restarts at the start of reader epoch 1 (finite): 12 sample(s) read before the "
            "checkpoint are read again and 0" in more.stderr)
    state = latest_state(run)
    assert state["step"] == 18 and state["loader"]["world_size"] == 2
    assert [r["micro_batches"] for r in state["loader"]["ranks"]] == [18, 18]

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == list(range(1, 19))  # every step once, in order
    assert all(torch.isfinite(torch.tensor(float(row["loss"]))) for row in rows)
