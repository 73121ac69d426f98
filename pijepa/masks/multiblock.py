"""I-JEPA's multi-block masking, vectorised over images, blocks and patches.

Per batch one target block size and one context block size are drawn (as in I-JEPA); per image
``npred`` target blocks and ``nenc`` context blocks are placed at random. The context is its block
minus the union of the targets (unless ``allow_overlap``), and every mask of a kind is cut to the
shortest one in the batch so the masks stack into ``[M, B, K]`` (see docs/contracts.md).

Differences from the original ``MaskCollator`` (all deliberate, all documented here):

- No unbounded retry loop. Each context block gets ``num_candidates`` placements drawn at once;
  the first one (in draw order) that keeps ``>= min_keep`` tokens with all targets excluded wins.
  If none does, the target exclusions are relaxed from the last target backwards (exactly the
  original's fallback order: it drops ``acceptable_regions[-1]`` first), choosing the first
  candidate that is valid with the fewest dropped targets. With every target dropped the context
  is the bare block, whose area the constructor checks to be ``>= min_keep``, so a choice always
  exists. The number of dropped targets per context mask is reported in ``BlockMasks.relaxed``.
- ``min_keep`` is a lower bound (``>=``) on context masks only. The original also requires
  ``> min_keep`` tokens of the (unconstrained) target blocks, which can never change a target and
  loops forever whenever ``h*w <= min_keep`` (e.g. an 8x8 grid with the default scales).
- Block sizes are the original's for both placements: clipped to ``H - 1`` (its
  ``while h >= height: h -= 1``; on a grid of height 1 the size is 1). ``placement`` changes only
  where blocks sit: ``"full"`` (default) draws top-left offsets from ``[0, H - h]`` inclusive, so
  blocks reach the last row and column; ``"original"`` draws them from ``[0, H - h)`` as the
  original does, so the last row/column is never covered (offset 0 when the block fills the axis).
- Randomness comes only from a generator seeded from ``(seed, step)``, never from global state or
  from which worker collates the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from pijepa.runtime.errors import ConfigError

MaskPlacement = Literal["full", "original"]
PLACEMENTS: tuple[str, ...] = get_args(MaskPlacement)


@dataclass(frozen=True)
class BlockMasks:
    """Boolean masks of one batch before conversion to index tensors (for tests and benchmarks)."""

    enc: torch.Tensor  # [nenc, B, N] bool, context masks (block minus excluded targets)
    pred: torch.Tensor  # [npred, B, N] bool, target blocks
    pred_size: tuple[int, int]  # (h, w) of every target block in the batch
    enc_size: tuple[int, int]  # (h, w) of every context block in the batch
    pred_scale: float  # drawn target scale (fraction of the grid before rounding)
    pred_aspect: float  # drawn target aspect ratio h / w
    enc_scale: float  # drawn context scale
    relaxed: torch.Tensor  # [nenc, B] long, targets NOT excluded from each context (0 = none)


def generator_for(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from a hash of ``(seed, step)``.

    SeedSequence mixes both integers thoroughly, so nearby seeds/steps give unrelated streams
    (``seed + step`` would make run 0 step 1 equal run 1 step 0).
    """
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    mixed = (int(state[0]) << 31) ^ int(state[1])  # 63 bits: within manual_seed's int64 range
    return torch.Generator().manual_seed(mixed)


def block_size(
    u: float,
    scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    grid: tuple[int, int],
) -> tuple[int, int]:
    """Block (h, w) for one uniform draw ``u``: the same draw sets scale and aspect, as in I-JEPA.

    Sizes are capped at H - 1 and W - 1 whatever the placement (the original's
    ``while h >= height: h -= 1``): ``placement`` changes only where a block may sit, never its size.
    """
    height, width = grid
    s = scale[0] + u * (scale[1] - scale[0])
    ar = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
    max_keep = int(height * width * s)  # the original truncates the token budget first
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    return min(max(h, 1), max(height - 1, 1)), min(max(w, 1), max(width - 1, 1))


def mean_block_area(scale: tuple[float, float], aspect_ratio: tuple[float, float], grid: tuple[int, int],
                    points: int = 20_000) -> float:
    """Expected tokens of one block: block_size averaged over its uniform draw u (midpoint rule;
    exact up to the rounding steps the grid of u points can miss)."""
    total = 0
    for i in range(points):
        h, w = block_size((i + 0.5) / points, scale, aspect_ratio, grid)
        total += h * w
    return total / points


def offset_bound(extent: int, size: int, placement: str) -> int:
    """Exclusive upper bound of the top/left offset of a block of ``size`` along ``extent``."""
    if placement == "original":
        return max(extent - size, 1)  # [0, extent - size), offset 0 when the block fills the axis
    return extent - size + 1  # [0, extent - size] inclusive


def box_masks(tops: torch.Tensor, lefts: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Boolean ``[..., H*W]`` masks of ``size`` boxes at ``(tops, lefts)`` (any leading shape).

    One broadcast comparison per axis over the patch grid: no loop over boxes or patches.
    """
    height, width = grid
    h, w = size
    rows = torch.arange(height)
    cols = torch.arange(width)
    in_rows = (rows >= tops[..., None]) & (rows < tops[..., None] + h)  # [..., H]
    in_cols = (cols >= lefts[..., None]) & (cols < lefts[..., None] + w)  # [..., W]
    return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)


def masks_to_indices(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``[M, B, N]`` -> long ``[M, B, K]``: each mask's first K indices ascending, K = batch min.

    Keying kept patches by their index and dropped ones by ``N + index`` puts every kept index
    before every dropped one; the K smallest keys are then exactly the K first kept indices.
    """
    num_tokens = masks.shape[-1]
    keep = int(masks.sum(-1).min())
    index = torch.arange(num_tokens)
    keys = torch.where(masks, index, index + num_tokens)
    return torch.topk(keys, keep, dim=-1, largest=False, sorted=True).values


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair[0], pair[1]


def _range(value: Sequence[float], name: str, upper: float | None) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (0.0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ConfigError(f"{name} must satisfy 0 < min <= max{bound}, got {tuple(value)!r}")
    return lo, hi


class MultiBlockMaskCollator:
    """Collates ``(step, image, label)`` samples and draws I-JEPA multi-block masks for the batch.

    Returns ``(images [B, 3, H, W], labels [B] long, masks_enc [nenc, B, Kenc], masks_pred
    [npred, B, Kpred])``; the masks depend only on ``(seed, step)``.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        enc_mask_scale: Sequence[float] = (0.85, 1.0),
        pred_mask_scale: Sequence[float] = (0.15, 0.2),
        aspect_ratio: Sequence[float] = (0.75, 1.5),
        nenc: int = 1,
        npred: int = 4,
        min_keep: int = 10,
        allow_overlap: bool = False,
        placement: str = "full",
        seed: int = 0,
        num_candidates: int = 20,
    ) -> None:
        image_h, image_w = _pair(input_size, "mask.input_size")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ConfigError(f"mask.patch_size must be a positive int, got {patch_size!r}")
        if image_h % patch_size or image_w % patch_size:
            raise ConfigError(f"mask.input_size {(image_h, image_w)} must be divisible by mask.patch_size {patch_size}")
        self.grid = (image_h // patch_size, image_w // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.enc_mask_scale = _range(enc_mask_scale, "mask.enc_mask_scale", 1.0)
        self.pred_mask_scale = _range(pred_mask_scale, "mask.pred_mask_scale", 1.0)
        self.aspect_ratio = _range(aspect_ratio, "mask.aspect_ratio", None)
        for name, value in (("mask.nenc", nenc), ("mask.npred", npred), ("mask.num_candidates", num_candidates)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if placement not in PLACEMENTS:
            raise ConfigError(f"mask.placement must be one of {PLACEMENTS}, got {placement!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"mask.seed must be an int >= 0, got {seed!r}")
        if not isinstance(min_keep, int) or not 1 <= min_keep <= self.num_patches:
            raise ConfigError(
                f"mask.min_keep={min_keep!r} must be an int in [1, {self.num_patches}] "
                f"(the {self.grid[0]}x{self.grid[1]} patch grid has {self.num_patches} patches)"
            )
        self.nenc, self.npred, self.min_keep = nenc, npred, min_keep
        self.allow_overlap, self.placement, self.seed = bool(allow_overlap), placement, seed
        self.num_candidates = num_candidates
        # The relaxation fallback ends at the bare context block, so its smallest possible area
        # (the size grows with the draw u; aspect is fixed at 1) must already hold min_keep tokens.
        h, w = block_size(0.0, self.enc_mask_scale, (1.0, 1.0), self.grid)
        if h * w < min_keep:
            raise ConfigError(
                f"mask.min_keep={min_keep} exceeds the smallest context block ({h}x{w} = {h * w} "
                f"patches at mask.enc_mask_scale[0]={self.enc_mask_scale[0]} on the "
                f"{self.grid[0]}x{self.grid[1]} grid, placement={placement!r})"
            )

    def sample_block_masks(self, batch_size: int, step: int) -> BlockMasks:
        """Boolean masks for one batch, before truncation (see the module docstring)."""
        if batch_size < 1 or step < 0:
            raise ValueError(f"need batch_size >= 1 and step >= 0, got {batch_size}, {step}")
        g = generator_for(self.seed, step)
        grid, placement, batch = self.grid, self.placement, batch_size
        u_pred = float(torch.rand(1, generator=g))
        u_enc = float(torch.rand(1, generator=g))
        pred_size = block_size(u_pred, self.pred_mask_scale, self.aspect_ratio, grid)
        enc_size = block_size(u_enc, self.enc_mask_scale, (1.0, 1.0), grid)

        def place(size: tuple[int, int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            tops = torch.randint(0, offset_bound(grid[0], size[0], placement), shape, generator=g)
            lefts = torch.randint(0, offset_bound(grid[1], size[1], placement), shape, generator=g)
            return tops, lefts

        pred = box_masks(*place(pred_size, (self.npred, batch)), pred_size, grid)  # [P, B, N]
        cand_tops, cand_lefts = place(enc_size, (self.nenc, batch, self.num_candidates))  # [E, B, C] each
        enc, relaxed = self._choose_context(pred, cand_tops, cand_lefts, enc_size)
        lo, hi = self.pred_mask_scale
        lo_ar, hi_ar = self.aspect_ratio
        return BlockMasks(
            enc=enc,
            pred=pred,
            pred_size=pred_size,
            enc_size=enc_size,
            pred_scale=lo + u_pred * (hi - lo),
            pred_aspect=lo_ar + u_pred * (hi_ar - lo_ar),
            enc_scale=self.enc_mask_scale[0] + u_enc * (self.enc_mask_scale[1] - self.enc_mask_scale[0]),
            relaxed=relaxed,
        )

    def _choose_context(self, pred: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor,
                        size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick, per context mask, the first valid candidate box with the fewest relaxed targets.

        Candidates stay (top, left) pairs: the excluded tokens inside each box are read off a
        summed-area table of each exclusion level (4 lookups per box), and only the chosen box of
        each context mask becomes a mask.
        """
        num_enc, batch, num_cand = tops.shape
        num_tokens, (height, width), (h, w) = pred.shape[-1], self.grid, size
        if self.allow_overlap:
            block = box_masks(tops[:, :, 0], lefts[:, :, 0], size, self.grid)
            return block, torch.zeros(num_enc, batch, dtype=torch.long)
        # excluded[b, k] = union of the first k targets of image b, k = 0..npred.
        counts = torch.cumsum(pred.transpose(0, 1).to(torch.int32), dim=1) > 0  # [B, P, N]
        excluded = torch.cat([torch.zeros(batch, 1, num_tokens, dtype=torch.bool), counts], dim=1)
        levels = excluded.shape[1]
        table = torch.zeros(batch, levels, height + 1, width + 1, dtype=torch.int32)
        table[:, :, 1:, 1:] = excluded.view(batch, levels, height, width).to(torch.int32).cumsum(2).cumsum(3)
        table = table.view(batch, levels, -1)

        def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # [E, B, C] -> [E, B, C, K]
            index = (rows * (width + 1) + cols).transpose(0, 1).reshape(batch, 1, -1).expand(-1, levels, -1)
            found = table.gather(2, index).view(batch, levels, num_enc, num_cand)
            return found.permute(2, 0, 3, 1)

        lost = corner(tops + h, lefts + w) - corner(tops, lefts + w) - corner(tops + h, lefts) + corner(tops, lefts)
        valid = (h * w - lost) >= self.min_keep  # [E, B, C, P+1]
        # Preference order: all targets excluded first (k = P, then P-1, ...), candidates in draw
        # order within a level. argmax returns the first True; level k = 0 is always valid.
        order = valid.flip(-1).transpose(-1, -2).reshape(num_enc, batch, -1)
        first = torch.argmax(order.to(torch.uint8), dim=-1)  # [E, B]
        level = self.npred - torch.div(first, num_cand, rounding_mode="floor")
        cand = (first % num_cand)[..., None]
        block = box_masks(tops.gather(2, cand).squeeze(2), lefts.gather(2, cand).squeeze(2), size, self.grid)
        drop = excluded[None].expand(num_enc, -1, -1, -1)
        drop = drop.gather(2, level[..., None, None].expand(-1, -1, 1, num_tokens)).squeeze(2)
        return block & ~drop, self.npred - level

    def sample_masks(self, batch_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masks_enc [nenc, B, Kenc], masks_pred [npred, B, Kpred])``, long, sorted indices."""
        blocks = self.sample_block_masks(batch_size, step)
        return masks_to_indices(blocks.enc), masks_to_indices(blocks.pred)

    def __call__(
        self, samples: Sequence[tuple[int, torch.Tensor, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not samples:
            raise ValueError("MultiBlockMaskCollator got an empty batch")
        steps = {int(s[0]) for s in samples}
        if len(steps) != 1:
            raise ValueError(f"all samples of a batch must carry the same step, got {sorted(steps)}")
        images = torch.stack([s[1] for s in samples])
        labels = torch.tensor([int(s[2]) for s in samples], dtype=torch.long)
        masks_enc, masks_pred = self.sample_masks(len(samples), steps.pop())
        return images, labels, masks_enc, masks_pred

    def __repr__(self) -> str:
        return (
            f"MultiBlockMaskCollator(grid={self.grid}, enc_mask_scale={self.enc_mask_scale}, "
            f"pred_mask_scale={self.pred_mask_scale}, aspect_ratio={self.aspect_ratio}, "
            f"nenc={self.nenc}, npred={self.npred}, min_keep={self.min_keep}, "
            f"allow_overlap={self.allow_overlap}, placement={self.placement!r}, seed={self.seed})"
        )
