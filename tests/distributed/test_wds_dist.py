"""The webdataset loader under torchrun (2 ranks, gloo): finite mode splits every epoch exactly, also
across a mid-epoch stop and resume whose position was gathered from both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import webdataset as wds

from pijepa.data.shards import write_shards
from tests.conftest import DATA, REPO, free_port, tar_subset

PORTS = range(29700, 29750)  # this file's rendezvous ports


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_finite_epoch_sees_each_sample_once_also_when_resumed(tmp_path):
    src = DATA / "cifar10" / "train"
    if not src.is_dir():
        pytest.skip(f"real image data not found at {src}")
    shards = tmp_path / "shards"
    write_shards(tar_subset(src, tmp_path / "src", 30), shards, samples_per_shard=25, progress=False)
    expected = Counter(s["__key__"] for s in wds.DataPipeline(
        wds.SimpleShardList(sorted(str(p) for p in shards.glob("*.tar"))), wds.tarfile_to_samples()))
    assert sum(expected.values()) == 300
    out = tmp_path / "out"
    out.mkdir()
    # 12 shards over 2 ranks x 2 workers: 75 samples per reader, 15 batches of 5; 30 micro-batches
    # per rank are one epoch. Stop after 7 (mid-epoch, mid worker round-robin).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port(PORTS)),
           str(REPO / "tests" / "distributed" / "wds_keys.py"), str(shards), str(out), "7", "30"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"

    seen = {(phase, rank): json.loads((out / f"{phase}_rank{rank}.json").read_text())
            for phase in ("full", "resumed") for rank in (0, 1)}
    for phase in ("full", "resumed"):
        both = seen[(phase, 0)] + seen[(phase, 1)]
        assert Counter(both) == expected, phase  # every sample exactly once over the two ranks
        assert not set(seen[(phase, 0)]) & set(seen[(phase, 1)])
    for rank in (0, 1):  # and the resumed run is the uninterrupted one, batch for batch
        assert seen[("resumed", rank)] == seen[("full", rank)]
