"""A regular (non-editable) wheel, installed outside the checkout, runs the default job and the
planner from another directory: configs and DeepSpeed JSONs come from the package, by bare name."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, launch_env

IGNORED = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", "docs")


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=launch_env(2), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A venv with only the built wheel installed; its dependencies (torch, ...) are borrowed from
    the test's own environment through a .pth line, which adds a path without running that
    environment's own .pth files (so the editable install there is not seen)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORED)
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
              str(tmp / "dist"), str(src)], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("pijepa-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", purelib],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
              "--no-index", "-q", str(wheel)], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(src)  # nothing of the source tree is left to fall back on
    return venv


@pytest.mark.slow
def test_wheel_holds_the_configs_and_runs_outside_the_checkout(wheel_env: Path, tmp_path: Path):
    py, cli = wheel_env / "bin" / "python", wheel_env / "bin" / "pijepa"
    where = _run([str(py), "-c", "import pijepa, pijepa.configs as c; print(pijepa.__file__); print(c.__file__)"],
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(wheel_env)) for line in where.stdout.split()), where.stdout

    run = tmp_path / "run"
    r = _run([str(cli), "train", "--config", "cpu_default", "--set", "optimization.max_steps=2",
              "--set", f"logging.folder={run}", "--set", "data.num_workers=0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    r = _run([str(cli), "plan", "--config", "in22k_vith14_ep66", "--gpus", "16", "--gpu", "a100-80gb"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as configured" in r.stdout

    # The DeepSpeed default (dist.deepspeed_config: ds_configs/zero2_bf16.json) and a bare name resolve
    # to the packaged JSONs from any directory.
    code = ("from pijepa.runtime.resources import resolve_packaged as r\n"
            "for name in ('ds_configs/zero2_bf16.json', 'zero3_fp32'):\n"
            "    p = r(name, 'deepspeed'); assert p.is_file() and 'site-packages' in str(p), p\n")
    r = _run([str(py), "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    r = _run([str(cli), "train", "--config", "no_such_config"], cwd=tmp_path)
    assert r.returncode == 2 and "cpu_default" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
