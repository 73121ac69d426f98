"""dist.activation_checkpointing and dist.compile under DDP, in real 2-rank gloo processes on CPU,
with the worker of test_ds_ac_compile.py: the blocks are wrapped (AC) and compiled before
DistributedDataParallel, a step computes exactly what it computes without AC, and the checkpoint
(`state.pt`) keeps the plain model's parameter names."""

from __future__ import annotations

import pytest
import torch

from pijepa.train.build import build_models
from tests.distributed.test_ds_ac_compile import _config, assert_same_step, expect_blocks, launch


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_activation_checkpointing_wraps_blocks_and_changes_nothing_else(tmp_path):
    plain = launch(tmp_path / "plain", "--strategy", "ddp")
    ac = launch(tmp_path / "ac", "--strategy", "ddp", "--ac", "full", "--save")
    expect_blocks(plain[0], "none", compiled=False)
    expect_blocks(ac[0], "full", compiled=False)
    assert_same_step(plain, ac)
    state = torch.load(tmp_path / "ac" / "step_2" / "state.pt", weights_only=True)
    models = build_models(_config(False))
    for part in ("encoder", "predictor", "target_encoder"):
        assert state[part].keys() == getattr(models, part).state_dict().keys(), part


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_compile_is_applied_per_block(tmp_path):
    eager = launch(tmp_path / "eager", "--strategy", "ddp", "--ac", "selective", "--steps", "1")
    compiled = launch(tmp_path / "compiled", "--strategy", "ddp", "--ac", "selective", "--steps", "1",
                      "--compile", "--save")
    expect_blocks(compiled[0], "selective", compiled=True)
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert max((x - y).abs().max().item() for x, y in zip(a["local"], b["local"])) < 1e-5
    state = torch.load(tmp_path / "compiled" / "step_1" / "state.pt", weights_only=True)
    assert state["encoder"].keys() == build_models(_config(False)).encoder.state_dict().keys()
