"""`pijepa features` under torchrun (2 ranks, gloo) writes the file one process writes."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest
import torch

from pijepa.eval.features_io import load_features
from pijepa.models import VisionTransformer
from tests.conftest import DATA, REPO, free_port

CLASSES = ["automobile", "bird", "frog"]
PORTS = range(29750, 29800)  # the range set aside for this project's torchrun tests


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    # One thread per process in both runs: the same kernels, so bit-identical features.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_write_the_features_of_one_process(tmp_path):
    src = DATA / "cifar10" / "train"
    if not src.is_dir():
        pytest.skip(f"real image data not found at {src}")
    data = tmp_path / "data"
    data.mkdir()
    for name in CLASSES:  # 7 images per class: 21 images, batch 4 -> ranks get 12 and 9
        with tarfile.open(src / f"{name}.tar") as tf, tarfile.open(data / f"{name}.tar", "w") as out:
            for m in [m for m in tf if m.isfile()][:7]:
                out.addfile(m, tf.extractfile(m))
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
    ckpt = tmp_path / "state.pt"
    torch.save({"encoder": encoder.state_dict(), "target_encoder": encoder.state_dict()}, ckpt)

    args = ["-m", "pijepa", "features", "--encoder", str(ckpt), "--data", str(data), "--batch-size", "4",
            "--workers", "0", "--no-progress", "--pool", "lastn", "--last-n", "2"]
    one = run([sys.executable, *args, "--out", str(tmp_path / "one.pt")])
    assert one.returncode == 0, one.stderr
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port(PORTS)), *args, "--out", str(tmp_path / "two.pt")])
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("wrote 21 x 384 features") == 1  # rank 0 alone writes and reports

    a, b = load_features(tmp_path / "one.pt"), load_features(tmp_path / "two.pt")
    assert a["features"].shape == (21, 384)
    assert torch.equal(a["features"], b["features"])
    assert torch.equal(a["labels"], b["labels"]) and a["labels"].tolist() == [i for i in range(3) for _ in range(7)]
    assert a["classes"] == b["classes"] == CLASSES
    assert a["meta"] == b["meta"]
    # No two rows are the same: a rank's part landing in the wrong place could not go unnoticed.
    assert torch.cdist(a["features"], a["features"]).add(torch.eye(21)).min() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one.pt", "state.pt", "two.pt"]
