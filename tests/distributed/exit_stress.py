"""The 2-rank start-and-exit path, many times over, cheaply: this script imports torch and pijepa once,
then for each round forks two ranks that each start the tiny config under FSDP (gloo), run one
real training step, close the strategy and leave Python the normal way: SystemExit unwinds to the
top of the forked interpreter, which runs its atexit handlers and shuts down as any rank's would.
Prints one JSON line: each round's exit codes (-6 is the abort of a rank that left threads behind).

    python -m tests.distributed.exit_stress ROUNDS
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch

from pijepa.config import load_config
from pijepa.train.build import build_strategy_for
from pijepa.train.step import TrainStep
from tests.conftest import REPO, TINY_OVERRIDES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int) -> None:
    """Start (process group, FSDP over the tiny models), one real step with every collective of a
    training step, exit: a rank's life without the data pipeline and the checkpoint."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(REPO / "configs/cpu_default.yaml", [*TINY_OVERRIDES, "dist.strategy=fsdp"])
    strategy = build_strategy_for(cfg)
    try:
        stepper = TrainStep(cfg, strategy, accum=1, steps_per_epoch=10)
        batch, k = cfg.data.micro_batch, cfg.mask
        grid = (cfg.data.crop_size // k.patch_size) ** 2
        images = torch.randint(0, 255, (batch, 3, cfg.data.crop_size, cfg.data.crop_size), dtype=torch.uint8)
        masks_enc = torch.arange(grid - 4).expand(1, batch, grid - 4).contiguous()
        masks_pred = torch.arange(4).expand(k.num_pred_masks, batch, 4).contiguous()
        stepper.run(0, [(images, torch.zeros(batch), masks_enc, masks_pred)])
    finally:
        strategy.close()


def one_round() -> list[int]:
    port, children = free_port(), []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:  # the rank: its work, then the interpreter's own exit (not os._exit)
            sys.stdin.close()
            rank_main(rank, port)
            raise SystemExit(0)
        children.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = "1"
    codes = [one_round() for _ in range(int(sys.argv[1]))]
    print(json.dumps({"codes": codes}))
