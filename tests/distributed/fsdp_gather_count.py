"""Run under torchrun: trains the tiny config with FSDP for 2 optimizer steps and prints, as JSON on
rank 0, the all-gathers FSDP2 issued and the FSDP units of each model (see test_fsdp_accumulation.py).
argv: run folder, accumulation steps."""

import json
import sys

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from pijepa.config import load_config
from pijepa.train.trainer import Trainer
from tests.conftest import REPO, TINY_OVERRIDES

# FSDP2's default all-gather calls this function of torch.distributed (torch 2.14); older
# releases called all_gather_into_tensor.
NAME = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
calls = []
original = getattr(dist, NAME)


def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)


setattr(dist, NAME, counted)
folder, accum = sys.argv[1], int(sys.argv[2])
cfg = load_config(REPO / "configs/cpu_default.yaml", [
    *TINY_OVERRIDES, "dist.strategy=fsdp", "data.batch_size=4", f"data.global_batch_size={8 * accum}",
    "optimization.max_steps=2", "logging.log_freq=100", "logging.checkpoint_freq=100", "logging.tensorboard=false",
    f"logging.folder={folder}"])
trainer = Trainer(cfg)
units = {name: sum(isinstance(m, FSDPModule) for m in getattr(trainer.models, name).modules())
         for name in ("encoder", "predictor", "target_encoder")}
calls.clear()
step = trainer.train_step
counts = []


def counting_step(batches):
    before = len(calls)
    out = step(batches)
    counts.append(len(calls) - before)
    return out


trainer.train_step = counting_step
trainer.train()
rank = trainer.strategy.rank
trainer.close()
if rank == 0:
    print(json.dumps({"per_step": counts, "units": units}))
