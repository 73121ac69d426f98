"""DataLoader workers ignore SIGTERM (a scheduler's signal must not kill them before the trainer
saves); that must not make the trainer hang at exit when an exception leaves a loader alive."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import torch
    from torch.utils.data import Dataset
    from pijepa.data.loader import build_step_loader

    class Images(Dataset):
        def __len__(self): return 64
        def __getitem__(self, i): return torch.zeros(3, 8, 8), 0

    def collator(items):  # runs in the worker; a bug there reaches the main process as an exception
        raise RuntimeError("a bug in the collator")

    loader = build_step_loader(Images(), lambda x: x, collator, batch_size=4, accum=1, world_size=1,
                               rank=0, start_step=0, total_steps=16, seed=0, num_workers=2, pin_memory=False)
    for _ in loader:
        pass
""")


def test_an_uncaught_error_with_live_workers_exits_instead_of_hanging():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "a bug in the collator" in r.stderr
