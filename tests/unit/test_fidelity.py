"""pijepa trains like I-JEPA's reference code by default (issue 16): each rule below is written
from the reference's behaviour, not imported from it."""

from __future__ import annotations

import torch

from pijepa.config import load_config
from pijepa.masks import MultiBlockMaskCollator
from pijepa.parallel.base import param_groups
from pijepa.train.build import build_models


def test_full_placement_changes_positions_only_not_sizes():
    """The reference caps a block at H - 1 rows (`while h >= height: h -= 1`): with
    enc_mask_scale [0.85, 1] the context block is never the whole grid, for either placement."""
    for grid_px, patch in ((224, 16), (64, 8), (224, 14)):
        full = MultiBlockMaskCollator(grid_px, patch, placement="full")
        original = MultiBlockMaskCollator(grid_px, patch, placement="original")
        height, width = full.grid
        for step in range(60):
            a, b = full.sample_block_masks(4, step), original.sample_block_masks(4, step)
            assert a.enc_size == b.enc_size and a.pred_size == b.pred_size  # same draws, same sizes
            assert a.enc_size[0] <= height - 1 and a.enc_size[1] <= width - 1


def test_weight_decay_groups_follow_the_reference_rule():
    """The reference decays every parameter with `'bias' not in name and p.ndim != 1`: weight
    matrices, the patch kernel and the predictor's 3-D mask_token; not biases or LayerNorms."""
    models = build_models(load_config("cpu_default"))
    decay, no_decay = param_groups(models)
    decayed = {id(p) for p in decay["params"]}
    for module in models.trainable():
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert (id(p) in decayed) == ("bias" not in name and p.ndim != 1), name
    assert id(models.predictor.mask_token) in decayed
    assert no_decay["weight_decay"] == 0.0


def test_a_fresh_run_starts_from_the_reference_init():
    models = build_models(load_config("cpu_default"))
    for blocks in (models.encoder.blocks, models.predictor.predictor_blocks):
        last = blocks[-1]
        for w in (last.attn.proj.weight, last.mlp.fc2.weight):
            assert abs(w.std().item() - 0.02) <= 0.15 * 0.02
    assert all(torch.equal(a, b) for a, b in zip(models.encoder.state_dict().values(),
                                                  models.target_encoder.state_dict().values()))
    scaled = build_models(load_config("cpu_default", ["meta.weight_init=depth_scaled"]))
    depth = len(scaled.encoder.blocks)
    expected = 0.02 / (2 * depth) ** 0.5
    assert abs(scaled.encoder.blocks[-1].attn.proj.weight.std().item() - expected) <= 0.15 * expected
