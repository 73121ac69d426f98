"""What the launch scripts hand to SLURM and to the ranks, checked without SLURM: `srun` is a
stand-in that records its arguments and environment instead of starting anything."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

SRUN = """\
#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_SRUN_ARGS"
env > "$FAKE_SRUN_ENV"
"""
SCONTROL = """\
#!/usr/bin/env bash
if [ "$1" = show ]; then echo node0; echo node1; fi
"""


@pytest.mark.parametrize("script", ["slurm_torchrun.sbatch", "slurm_deepspeed.sbatch"])
def test_sbatch_passes_its_cpus_to_srun_and_asks_for_enough(script, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": SRUN, "scontrol": SCONTROL}.items():
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    args_file, env_file = tmp_path / "args.txt", tmp_path / "env.txt"
    text = (REPO / "launchers" / script).read_text()
    requested = int(re.search(r"^#SBATCH --cpus-per-task=(\d+)$", text, re.M).group(1))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_CPUS_PER_TASK": str(requested), "SLURM_SUBMIT_DIR": str(tmp_path),
           "HOSTFILE": str(tmp_path / "hostfile"), "FAKE_SRUN_ARGS": str(args_file), "FAKE_SRUN_ENV": str(env_file)}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    r = subprocess.run(["bash", str(REPO / "launchers" / script), "--config", "in22k_vith14_ep66"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    srun_args = args_file.read_text().splitlines()
    assert f"--cpus-per-task={requested}" in srun_args  # not inherited from sbatch since Slurm 22.05
    # 8 GPUs per node, each rank with the recipes' 10 DataLoader workers and itself.
    assert requested >= 8 * (1 + 10)


def test_common_sets_the_allocator_and_keeps_a_users_choice():
    common = REPO / "launchers" / "_common.sh"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    show = f'source "{common}"; echo "$PYTORCH_CUDA_ALLOC_CONF"'
    out = subprocess.run(["bash", "-c", show], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "expandable_segments:True"
    out = subprocess.run(["bash", "-c", show], env={**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "max_split_size_mb:512"


def test_multi_node_recipes_say_where_the_run_folder_must_live():
    for name in ("in22k_vith14_ep66", "in22k_vitg16_ep44", "in1k_vith14_ep300", "in1k_vith16-448_ep300"):
        text = Path(REPO / "configs" / f"{name}.yaml").read_text()
        assert "all share" in text and "logging.folder=/shared/runs" in text, name
