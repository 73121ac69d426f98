"""pijepa trains like I-JEPA's reference code by default: each rule below is written
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


RECIPES = ("in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vith14_ep66", "in22k_vitg16_ep44")
PUBLISHED_BATCH_PER_GPU = 128  # the published I-JEPA recipes: 2048 images on 16 GPUs


def test_recipes_carry_the_published_pkt_balance():
    """L2_PKT_chunks = (sum of chunk PKTs + L2) / n_chunks trains under AdamW like
    L2 + n_chunks x mean chunk PKT; n_chunks = (batch x targets x tokens) / chunk at the published
    per-GPU shapes. The recipes' pkt_weight must be that number, computed from their own masks."""
    import pytest

    from pijepa.losses.balance import published_pkt_weight
    from pijepa.masks.multiblock import mean_block_area

    for name in RECIPES:
        cfg = load_config(name)
        k, o = cfg.mask, cfg.optimization
        grid = (cfg.data.crop_size // k.patch_size,) * 2
        mean_tokens = mean_block_area(tuple(k.pred_mask_scale), tuple(k.aspect_ratio), grid)
        weight = published_pkt_weight(PUBLISHED_BATCH_PER_GPU, k.num_pred_masks, mean_tokens, o.pkt_chunk_size)
        assert o.loss_function == "L2_PKT" and o.pkt_weight == pytest.approx(weight, abs=0.05), name
    # The ViT-H/14 figure the issue estimated (~88) from 22,528 rows per GPU.
    assert load_config("in22k_vith14_ep66").optimization.pkt_weight == pytest.approx(88, abs=1)


def test_mean_block_area_is_what_the_collator_draws():
    from pijepa.masks.multiblock import mean_block_area

    collator = MultiBlockMaskCollator(224, 14)
    drawn = [collator.sample_block_masks(1, step).pred_size for step in range(3000)]
    empirical = sum(h * w for h, w in drawn) / len(drawn)
    expected = mean_block_area(collator.pred_mask_scale, collator.aspect_ratio, collator.grid)
    assert abs(empirical - expected) < 0.02 * expected


def test_l2_pkt_chunks_trains_like_l2_pkt_at_the_chunk_count_weight():
    """Up to a constant factor (which AdamW ignores) the published loss is L2_PKT with
    pkt_weight = n_chunks: their gradients on the predictions are parallel, in ratio 1 / n_chunks."""
    from pijepa.losses import build_loss

    torch.manual_seed(0)
    masks = torch.stack([torch.randperm(64)[:10].sort().values.repeat(32, 1) for _ in range(4)])  # [4, 32, 10]
    h = torch.randn(32, 64, 48)
    pred = torch.randn(4 * 32, 10, 48, requires_grad=True)
    rows, chunk = masks.numel(), 64  # 1280 rows: 20 full chunks
    chunks = build_loss("L2_PKT_chunks", chunk_size=chunk)
    explicit = build_loss("L2_PKT", chunk_size=chunk, pkt_weight=rows / chunk)
    (g_chunks,) = torch.autograd.grad(chunks(pred, h, masks)[0], pred)
    (g_explicit,) = torch.autograd.grad(explicit(pred, h, masks)[0], pred)
    torch.testing.assert_close(g_chunks * (rows / chunk), g_explicit, rtol=1e-5, atol=1e-8)


def test_term_gradient_norms_and_collapse_stats_against_plain_autograd():
    from pijepa.losses import build_loss
    from pijepa.train.diagnostics import collapse_stats, term_gradient_norms

    torch.manual_seed(1)
    masks = torch.stack([torch.randperm(16)[:4].sort().values.repeat(8, 1) for _ in range(2)])  # [2, 8, 4]
    h = torch.randn(8, 16, 32)
    pred = torch.randn(16, 4, 32, requires_grad=True)
    loss_fn = build_loss("L2_PKT", chunk_size=16, pkt_weight=100.0)
    terms, _ = loss_fn.terms(pred, h, masks)
    norms = term_gradient_norms(terms, pred)
    for name in ("l2", "pkt"):
        weight = 1.0 if name == "l2" else 100.0
        part = build_loss("L2" if name == "l2" else "PKT", chunk_size=16)
        (g,) = torch.autograd.grad(weight * part(pred, h, masks)[0], pred)
        assert torch.isclose(norms[f"grad_{name}"], g.norm(), rtol=1e-5)
    share = norms["grad_pkt"] / (norms["grad_l2"] + norms["grad_pkt"])
    assert torch.isclose(norms["grad_share_pkt"], share)
    # Collapse: identical images have no spread and effective rank 1; random ones a high rank.
    stats = collapse_stats(h[:1].repeat(8, 1, 1))
    assert stats["target_std"].item() < 1e-6 and abs(stats["target_rank"].item() - 1) < 1e-3
    assert collapse_stats(torch.randn(64, 16, 32))["target_rank"].item() > 20


def test_collapse_stats_of_a_diverged_step_are_nan_not_an_error():
    from pijepa.train.diagnostics import collapse_stats

    h = torch.randn(4, 16, 32)
    h[1, 3, 5] = float("nan")
    stats = collapse_stats(h)
    assert torch.isnan(stats["target_rank"])


def test_checkpoints_from_before_the_decay_rule_change_resume_with_their_moments():
    """Checkpoints written before mask_token joined the decayed group hold an optimizer state with
    the old grouping; it is re-indexed so every parameter keeps its AdamW moments."""
    from pijepa.parallel.base import _legacy_decayed, regroup_optimizer_state

    models = build_models(load_config("cpu_default"))
    named = [(n, p) for m in models.trainable() for n, p in m.named_parameters() if p.requires_grad]
    legacy = torch.optim.AdamW([{"params": [p for n, p in named if _legacy_decayed(n, p)]},
                                {"params": [p for n, p in named if not _legacy_decayed(n, p)], "weight_decay": 0.0}])
    for _, p in named:
        p.grad = torch.randn_like(p)
    legacy.step()
    current = torch.optim.AdamW(param_groups(models))
    current.load_state_dict(regroup_optimizer_state(legacy.state_dict(), current, models))
    for _, p in named:
        assert torch.equal(current.state[p]["exp_avg"], legacy.state[p]["exp_avg"])
        assert torch.equal(current.state[p]["exp_avg_sq"], legacy.state[p]["exp_avg_sq"])
    same = torch.optim.AdamW(param_groups(models))
    assert regroup_optimizer_state(current.state_dict(), same, models) is not None  # current layout: as is
