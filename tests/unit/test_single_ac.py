"""Activation checkpointing and compile are applied by the single-process strategy too (the config
accepts them for every strategy, so none may ignore them)."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from pijepa.config import load_config
from pijepa.parallel.base import JEPAModels
from pijepa.train.trainer import Trainer
from tests.conftest import TINY_OVERRIDES


def _run(tmp_path, name: str, *extra: str) -> tuple[JEPAModels, list[dict]]:
    """The trained models (taken before the trainer closes: closing releases them) and metrics."""
    cfg = load_config("cpu_default", [*TINY_OVERRIDES, "optimization.max_steps=3", "logging.log_freq=1",
                                      "logging.tensorboard=false", f"logging.folder={tmp_path / name}", *extra])
    trainer = Trainer(cfg)
    try:
        trainer.train()
        models = trainer.models
    finally:
        trainer.close()
    return models, list(csv.DictReader((tmp_path / name / "metrics.csv").open()))


@pytest.mark.slow
def test_single_process_checkpoints_every_block_and_trains_the_same(tmp_path):
    plain, plain_rows = _run(tmp_path, "plain")
    ac, ac_rows = _run(tmp_path, "ac", "dist.activation_checkpointing=full")
    assert all(isinstance(b, CheckpointWrapper) for b in ac.encoder.blocks)
    assert not any(isinstance(b, CheckpointWrapper) for b in plain.encoder.blocks)
    for a, b in zip(plain_rows, ac_rows):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * max(1.0, float(a["loss"]))
    for (name, p), q in zip(plain.encoder.state_dict().items(), ac.encoder.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
