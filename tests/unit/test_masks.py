"""Multi-block masks: ranges, disjointness, min_keep, placement, determinism, agreement with the
per-image reference implementation."""

from __future__ import annotations

import math

import pytest
import torch

from pijepa.masks import MultiBlockMaskCollator, apply_masks
from pijepa.masks.multiblock import masks_to_indices
from pijepa.masks.reference import ReferenceMaskCollator

# (input_size, patch_size) -> 14x14, 16x16 and 8x8 patch grids.
GRIDS = [(224, 16), (256, 16), (32, 4)]
PLACEMENTS = ["full", "original"]
STEPS = 40
BATCH = 8


def _batches(collator: MultiBlockMaskCollator, steps: int = STEPS, batch: int = BATCH):
    for step in range(steps):
        yield step, collator.sample_block_masks(batch, step), collator.sample_masks(batch, step)


def _within_rounding(size: int, exact: float, limit: int) -> bool:
    """``size`` is ``round(exact)`` clipped to ``[1, limit]`` (a little slack for float ties)."""
    target = min(max(exact, 1.0), float(limit))
    return abs(size - target) <= 0.5 + 1e-9


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("input_size,patch", GRIDS)
def test_mask_invariants(input_size: int, patch: int, placement: str) -> None:
    col = MultiBlockMaskCollator(input_size, patch, placement=placement)
    height, width = col.grid
    num = height * width
    # Sizes are the original's for both placements: below the grid's extent.
    limit_h, limit_w = max(height - 1, 1), max(width - 1, 1)
    relaxed = 0
    for _, blocks, (enc, pred) in _batches(col):
        # Shapes, dtype, range, strictly ascending indices.
        assert enc.dtype == pred.dtype == torch.long
        assert enc.shape[:2] == (1, BATCH) and pred.shape[:2] == (4, BATCH)
        for idx in (enc, pred):
            assert idx.min() >= 0 and idx.max() < num
            assert (idx.diff(dim=-1) > 0).all()
        # Drawn scales inside the configured ranges; block sizes follow them within rounding.
        assert 0.15 <= blocks.pred_scale <= 0.2 and 0.75 <= blocks.pred_aspect <= 1.5
        assert 0.85 <= blocks.enc_scale <= 1.0
        h, w = blocks.pred_size
        budget = int(num * blocks.pred_scale)
        assert _within_rounding(h, math.sqrt(budget * blocks.pred_aspect), limit_h)
        assert _within_rounding(w, math.sqrt(budget / blocks.pred_aspect), limit_w)
        eh, ew = blocks.enc_size
        assert _within_rounding(eh, math.sqrt(int(num * blocks.enc_scale)), limit_h)
        assert _within_rounding(ew, math.sqrt(int(num * blocks.enc_scale)), limit_w)
        # Targets are whole blocks; contexts are at most a block and keep min_keep tokens.
        assert (blocks.pred.sum(-1) == h * w).all()
        assert (blocks.enc.sum(-1) <= eh * ew).all() and (blocks.enc.sum(-1) >= col.min_keep).all()
        assert enc.shape[-1] >= col.min_keep
        # Truncation keeps the first K kept indices of each boolean mask.
        assert torch.equal(enc, masks_to_indices(blocks.enc)) and enc.shape[-1] == blocks.enc.sum(-1).min()
        assert torch.equal(pred, masks_to_indices(blocks.pred))
        # Context and targets are disjoint unless the fallback relaxed an exclusion.
        union = blocks.pred.any(0)  # [B, N]
        overlap = (blocks.enc & union).any(-1)  # [1, B]
        assert not (overlap & (blocks.relaxed == 0)).any()
        clean = blocks.relaxed[0] == 0
        picked = torch.zeros(BATCH, num, dtype=torch.bool).scatter_(1, enc[0], True)
        assert not (picked[clean] & union[clean]).any()
        relaxed += int((~clean).sum())
    # The fallback is a rare event, never the rule (it only ever fires on the 8x8 grid).
    assert relaxed <= 0.02 * STEPS * BATCH


@pytest.mark.parametrize("input_size,patch", GRIDS)
def test_placement_reaches_last_row_and_column(input_size: int, patch: int) -> None:
    seen = {}
    for placement in PLACEMENTS:
        col = MultiBlockMaskCollator(input_size, patch, placement=placement)
        height, width = col.grid
        cover = torch.zeros(height, width, dtype=torch.bool)
        cover_pred = torch.zeros(height, width, dtype=torch.bool)
        for _, blocks, _ in _batches(col, steps=25):
            cover |= (blocks.pred.any(0) | blocks.enc.any(0)).any(0).view(height, width)
            cover_pred |= blocks.pred.any(0).any(0).view(height, width)
        seen[placement] = (cover, cover_pred)
    full, full_pred = seen["full"]
    orig, _ = seen["original"]
    assert full_pred[-1].any() and full_pred[:, -1].any()  # targets alone reach the border
    assert full_pred[-1, -1] or full[-1, -1]
    assert not orig[-1].any() and not orig[:, -1].any()


def test_original_placement_full_height_block() -> None:
    # A 1-row grid: blocks must be 1 row tall at offset 0 (the original would call randint(0, 0)).
    col = MultiBlockMaskCollator((16, 128), 16, min_keep=1, placement="original", pred_mask_scale=(0.2, 0.3))
    assert col.grid == (1, 8)
    for _, blocks, (enc, pred) in _batches(col, steps=10):
        assert blocks.pred_size[0] == 1 and blocks.enc_size[0] == 1
        assert enc.shape[-1] >= 1 and pred.max() < 8


def test_fallback_guarantees_min_keep_without_looping() -> None:
    # 4x4 grid, four targets of half the grid each and min_keep 8: the targets usually cover most
    # of the context block, so the relaxation fallback must kick in and still keep 8 tokens.
    col = MultiBlockMaskCollator(16, 4, pred_mask_scale=(0.5, 0.5), aspect_ratio=(1.0, 1.0), min_keep=8)
    relaxed = 0
    for _, blocks, (enc, _) in _batches(col, steps=20):
        assert enc.shape[-1] >= 8 and (blocks.enc.sum(-1) >= 8).all()
        relaxed += int((blocks.relaxed > 0).sum())
        # Relaxation drops the last targets first: the kept exclusions are respected.
        for b in range(BATCH):
            kept_targets = col.npred - int(blocks.relaxed[0, b])
            assert not (blocks.enc[0, b] & blocks.pred[:kept_targets, b].any(0)).any()
    assert relaxed > 0


def test_determinism() -> None:
    col = MultiBlockMaskCollator(224, 16, seed=3)
    enc, pred = col.sample_masks(8, 7)
    torch.manual_seed(123)
    torch.rand(10)  # global RNG use must not matter
    col.sample_masks(8, 2)  # nor the collator's history
    state = torch.random.get_rng_state()
    enc2, pred2 = MultiBlockMaskCollator(224, 16, seed=3).sample_masks(8, 7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(enc, enc2) and torch.equal(pred, pred2)
    other_step = col.sample_masks(8, 8)
    other_seed = MultiBlockMaskCollator(224, 16, seed=4).sample_masks(8, 7)
    for enc3, pred3 in (other_step, other_seed):
        assert enc3.shape != enc.shape or not torch.equal(enc3, enc)
        assert pred3.shape != pred.shape or not torch.equal(pred3, pred)
    # (seed, step) are mixed, not added: seed 0 step 1 differs from seed 1 step 0.
    a = MultiBlockMaskCollator(224, 16, seed=0).sample_masks(8, 1)[1]
    b = MultiBlockMaskCollator(224, 16, seed=1).sample_masks(8, 0)[1]
    assert a.shape != b.shape or not torch.equal(a, b)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("input_size,patch", GRIDS)
def test_matches_reference_statistically(input_size: int, patch: int, placement: str) -> None:
    fast = MultiBlockMaskCollator(input_size, patch, placement=placement)
    slow = ReferenceMaskCollator(input_size, patch, placement=placement)
    steps, batch = 30, 16
    height, width = fast.grid
    ctx_fast, ctx_slow = [], []
    cover_fast = torch.zeros(height * width)
    cover_slow = torch.zeros(height * width)
    for step in range(steps):
        a, b = fast.sample_block_masks(batch, step), slow.sample_block_masks(batch, step)
        # Same (seed, step) generator for the size draws: identical block sizes.
        assert a.pred_size == b.pred_size and a.enc_size == b.enc_size
        assert (b.pred.sum(-1) == a.pred.sum(-1)).all()
        ctx_fast.append(a.enc.sum(-1).float())
        ctx_slow.append(b.enc.sum(-1).float())
        cover_fast += a.pred.float().sum((0, 1))
        cover_slow += b.pred.float().sum((0, 1))
        enc_ref, pred_ref = slow.sample_masks(batch, step)
        assert (pred_ref.diff(dim=-1) > 0).all() and enc_ref.shape[-1] >= slow.min_keep
    mean_fast, mean_slow = torch.cat(ctx_fast).mean(), torch.cat(ctx_slow).mean()
    assert abs(mean_fast - mean_slow) <= 0.05 * mean_slow
    # Per-patch target coverage frequency agrees (same spatial distribution of blocks).
    cover_fast /= steps * batch * fast.npred
    cover_slow /= steps * batch * fast.npred
    assert (cover_fast - cover_slow).abs().max() <= 0.06


def test_collator_call() -> None:
    col = MultiBlockMaskCollator(32, 4, seed=1)
    samples = [(5, torch.full((3, 32, 32), float(i)), i) for i in range(6)]
    images, labels, enc, pred = col(samples)
    assert images.shape == (6, 3, 32, 32) and images[3, 0, 0, 0] == 3
    assert labels.dtype == torch.long and labels.tolist() == list(range(6))
    enc_ref, pred_ref = col.sample_masks(6, 5)
    assert torch.equal(enc, enc_ref) and torch.equal(pred, pred_ref)
    # The masks feed apply_masks directly.
    tokens = torch.randn(6, 64, 5)
    assert apply_masks(tokens, pred).shape == (4 * 6, pred.shape[-1], 5)
    with pytest.raises(ValueError, match="same step"):
        col([(1, samples[0][1], 0), (2, samples[1][1], 1)])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input_size": 32, "patch_size": 4, "min_keep": 65}, r"mask\.min_keep=65.*8x8.*64"),
        ({"input_size": 32, "patch_size": 4, "min_keep": 0}, r"mask\.min_keep"),
        (
            {"input_size": 32, "patch_size": 4, "enc_mask_scale": (0.1, 0.2), "min_keep": 20},
            r"mask\.min_keep=20.*smallest context",
        ),
        ({"input_size": 30, "patch_size": 4}, r"divisible"),
        ({"pred_mask_scale": (0.3, 0.2)}, r"mask\.pred_mask_scale"),
        ({"enc_mask_scale": (0.85, 1.2)}, r"mask\.enc_mask_scale"),
        ({"aspect_ratio": (0.0, 1.5)}, r"mask\.aspect_ratio"),
        ({"npred": 0}, r"mask\.npred"),
        ({"placement": "edge"}, r"mask\.placement"),
        ({"seed": -1}, r"mask\.seed"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiBlockMaskCollator(**kwargs)
