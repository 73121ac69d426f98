"""FSDP2 with gradient accumulation gathers the encoder's and predictor's parameters once per
optimizer step, not in every micro-step, and still trains exactly: 2 ranks x 2 micro-steps
follow the single process with the same micro-batches."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, launch_env

pytestmark = pytest.mark.slow


def gathers(run_dir, accum):
    port = free_port(range(29690, 29700))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(REPO / "tests/distributed/fsdp_gather_count.py"), str(run_dir), str(accum)]
    r = subprocess.run(cmd, cwd=REPO, env={**launch_env(1), "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_accumulation_gathers_once_per_step(tmp_path):
    one, three = gathers(tmp_path / "a1", 1), gathers(tmp_path / "a3", 3)
    units = one["units"]
    enc, pred, target = units["encoder"], units["predictor"], units["target_encoder"]
    blocks = enc - 1 + pred - 1  # the roots stay gathered from forward to backward
    # Without accumulation: forward, the blocks again in backward (full sharding), the target.
    assert one["per_step"] == [enc + pred + blocks + target] * 2
    # With 3 micro-steps: encoder and predictor once, the target in each micro-step.
    assert three["per_step"] == [enc + pred + 3 * target] * 2
