"""Straightforward multi-block masking: I-JEPA's algorithm with per-image, per-block Python loops.

Used by the tests (statistical comparison with the vectorised collator) and by ``pijepa bench
masks`` as the baseline. It follows the original ``MaskCollator`` step by step: one uniform draw
per block kind sets scale and aspect, targets are placed one at a time, and each context block is
retried up to 20 times per relaxation level, dropping the last target's exclusion after each 20
failures. Deviations, shared with ``MultiBlockMaskCollator`` so that the two are comparable:
``min_keep`` bounds context masks only and means ``>=``, and ``placement="full"`` lets blocks
reach the last row/column. The block-size draws use the same ``(seed, step)`` generator as the
vectorised collator, so both give identical block sizes for a step; only positions differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pijepa.masks.multiblock import (
    BlockMasks,
    MultiBlockMaskCollator,
    block_size,
    generator_for,
    offset_bound,
)

_TIMEOUT = 20  # placements tried per relaxation level, as in the original


class ReferenceMaskCollator(MultiBlockMaskCollator):
    """Same constructor and ``sample_masks`` API as ``MultiBlockMaskCollator``; slow loops inside."""

    def _place(self, g: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        top = int(torch.randint(0, offset_bound(self.grid[0], h, self.placement), (1,), generator=g))
        left = int(torch.randint(0, offset_bound(self.grid[1], w, self.placement), (1,), generator=g))
        mask = torch.zeros(self.grid, dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        return mask.flatten()

    def _context(
        self, g: torch.Generator, size: tuple[int, int], targets: list[torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        regions = [] if self.allow_overlap else targets
        for tries in range(len(regions) + 1):
            for _ in range(_TIMEOUT):
                mask = self._place(g, size)
                for region in regions[: len(regions) - tries]:
                    mask = mask & ~region
                if int(mask.sum()) >= self.min_keep:
                    return mask, tries
        raise RuntimeError("unreachable: the constructor checks the bare context block holds min_keep")

    def sample_block_masks(self, batch_size: int, step: int) -> BlockMasks:
        g = generator_for(self.seed, step)
        u_pred = float(torch.rand(1, generator=g))
        u_enc = float(torch.rand(1, generator=g))
        pred_size = block_size(u_pred, self.pred_mask_scale, self.aspect_ratio, self.grid)
        enc_size = block_size(u_enc, self.enc_mask_scale, (1.0, 1.0), self.grid)
        pred, enc, relaxed = [], [], []
        for _ in range(batch_size):
            targets = [self._place(g, pred_size) for _ in range(self.npred)]
            contexts = [self._context(g, enc_size, targets) for _ in range(self.nenc)]
            pred.append(torch.stack(targets))
            enc.append(torch.stack([c[0] for c in contexts]))
            relaxed.append(torch.tensor([c[1] for c in contexts]))
        lo, hi = self.pred_mask_scale
        return BlockMasks(
            enc=torch.stack(enc, dim=1),
            pred=torch.stack(pred, dim=1),
            pred_size=pred_size,
            enc_size=enc_size,
            pred_scale=lo + u_pred * (hi - lo),
            pred_aspect=self.aspect_ratio[0] + u_pred * (self.aspect_ratio[1] - self.aspect_ratio[0]),
            enc_scale=self.enc_mask_scale[0] + u_enc * (self.enc_mask_scale[1] - self.enc_mask_scale[0]),
            relaxed=torch.stack(relaxed, dim=1),
        )

    def sample_masks(self, batch_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.sample_block_masks(batch_size, step)
        return _truncate(blocks.enc), _truncate(blocks.pred)


def _truncate(masks: torch.Tensor) -> torch.Tensor:
    """The original's collation: nonzero indices of each mask, all cut to the shortest."""
    rows: list[list[torch.Tensor]] = [[m.nonzero().flatten() for m in per_mask] for per_mask in masks]
    keep = min(len(idx) for per_mask in rows for idx in per_mask)
    return torch.stack([torch.stack([idx[:keep] for idx in per_mask]) for per_mask in rows])


__all__: Sequence[str] = ("ReferenceMaskCollator",)
