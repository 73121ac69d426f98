"""A save that fails on 2 ranks (every write into the checkpoint's folder fails with ENOSPC:
tests/faults.py) ends the run on every rank with one line and exit code 74, the partial `.tmp`
removed and the last good checkpoint named; rerun without the fault, the run resumes from it.
FSDP (DCP, synchronous and asynchronous saves) and DeepSpeed ZeRO-2."""

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.reliability import clean_env, finish, start, train_args

_PORTS = iter(range(29990, 30000))  # this file's share of the machine's ports
DEEPSPEED = ["dist.strategy=deepspeed", "dist.deepspeed_config=ds_configs/zero2_fp32.json"]
CASES = {"fsdp": ["dist.strategy=fsdp"], "fsdp-async": ["dist.strategy=fsdp", "dist.async_checkpoint=true"],
         "zero2": DEEPSPEED}


def launch(run_dir: Path, sets: list[str], fault_step: int | None):
    port = free_port(_PORTS)
    module = ["-m", "tests.faults"] if fault_step else ["-m", "pijepa"]
    args = train_args(run_dir, [*sets, "optimization.max_steps=6"])[3:]  # after `-m pijepa train`
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), *module, "train", *args]
    env = clean_env(threads=1)
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR",
                                                 str(Path.home() / ".cache/pijepa-torch-extensions"))
    if fault_step:
        env["PIJEPA_FAULT_SAVE_STEP"] = str(fault_step)
    return start(cmd, env)


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_a_failed_save_ends_every_rank_in_one_line_and_resumes(tmp_path, case):
    run = tmp_path / "run"
    code, _, err = finish(launch(run, CASES[case], fault_step=4))  # saves every 2 steps: 2 fits, 4 fails
    assert code != 0
    errors = [x[x.index("pijepa train: error:"):] for x in err.splitlines() if "pijepa train: error:" in x]
    assert len(errors) == 2, err[-4000:]  # one line from each rank
    for line in errors:
        assert "writing checkpoint step_00000004 failed (OSError: [Errno 28] No space left on device" in line
        assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000002'}" in line
    assert 'File "' + str(Path(__file__).parents[2] / "pijepa") not in err, err[-4000:]  # no traceback of pijepa's
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]

    code, _, err = finish(launch(run, CASES[case], fault_step=None))
    assert code == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in err
