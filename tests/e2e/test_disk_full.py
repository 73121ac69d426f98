"""A disk that fills during a save, for real: a 100 MB tmpfs (skipped where this process may not
mount one). The default job's first checkpoint (88 MB) fits; the second cannot: one line, exit code
74, no traceback, the partial `.tmp` gone; a warning came after the first save that the next would
not fit; once the file system has room, the same command resumes from the checkpoint it named."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import run_cli


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(small_tmpfs):
    run = small_tmpfs / "run"
    args = ["train", "--config", "cpu_default", "--set", f"logging.folder={run}", "--set", "logging.checkpoint_freq=2",
            "--set", "optimization.max_steps=6", "--set", "logging.tensorboard=false"]
    r = run_cli(*args)
    assert r.returncode == 74, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.replace("\r", "\n").splitlines() if x.startswith("pijepa")]
    assert "not enough for the next checkpoint" in lines[-2]  # warned after the first save
    last = lines[-1]
    assert last.startswith(f"pijepa train: error: {run / 'checkpoints'}: writing checkpoint step_00000004 failed")
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000002'}" in last and "free on" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_tmpfs)], check=True)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in r.stderr
    assert (run / "checkpoints" / "step_00000006").is_dir()
