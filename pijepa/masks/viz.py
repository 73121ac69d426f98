"""Pictures of the multi-block masks the collator draws (`pijepa viz masks`, the trainer's
TensorBoard images).

Each image of a grid is shown with:

* the **context** patches (what the context encoder sees: its block minus the targets, cut to the
  batch's common length exactly as the collator's index masks are) tinted blue;
* each **target block** tinted in its own colour with an outline of the same colour; targets are
  drawn over the context, and a later target over an earlier one where they overlap;
* every other patch darkened (neither seen by the context encoder nor predicted).

The tints are plain tensor ops and the outlines torchvision's `draw_bounding_boxes` (`render_grid`),
so the trainer can log the grid to TensorBoard cheaply (`mask_grid_from_batch`, from the masks of
the batch it just trained on); `save_png` adds a title with the block sizes and writes a PNG with
matplotlib. In the PNG the grid sits below the title band pixel for pixel (no resampling), so each
patch's colour can be read back.

torchvision's `draw_segmentation_masks` does not fit the tints: one call blends every mask with one
alpha (context, targets and the darkening use three), paints pixels where masks overlap black
(here the later target wins), truncates instead of rounding, and blending call after call would
compound the tints where blocks overlap instead of tinting the image once.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

CONTEXT_COLOUR = (30, 100, 255)
# Distinct from the context blue and from each other; cycled when there are more targets.
TARGET_COLOURS = ((235, 30, 30), (30, 200, 60), (255, 165, 0), (200, 50, 230),
                  (0, 215, 215), (255, 240, 0), (255, 105, 180), (140, 90, 40))
CONTEXT_ALPHA = 0.45  # tint strength over the image
TARGET_ALPHA = 0.6
HIDDEN_SCALE = 0.3  # brightness left to patches in neither the context nor a target
GAP = 4  # pixels between tiles (white)
BLANK_GREY = 128  # fallback images when the config's data cannot be read
LINE_PX = 16  # title band: pixels per text line


# ----------------------------------------------------------------------------- masks


def indices_to_bool(masks: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Index masks ``[M, B, K]`` (long) -> boolean ``[M, B, N]``."""
    out = torch.zeros(*masks.shape[:2], num_patches, dtype=torch.bool)
    out.scatter_(-1, masks.long().cpu(), True)
    return out


def bounding_box(mask: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) in patches of a boolean ``[N]`` mask; None when empty."""
    rows, cols = torch.nonzero(mask.view(grid), as_tuple=True)
    if rows.numel() == 0:
        return None
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1


def _upsample(mask: torch.Tensor, grid: tuple[int, int], patch_px: int) -> torch.Tensor:
    """Boolean ``[N]`` patch mask -> ``[H, W]`` pixel mask with ``patch_px`` pixels per patch."""
    return mask.view(grid).repeat_interleave(patch_px, 0).repeat_interleave(patch_px, 1)


# ----------------------------------------------------------------------------- drawing


def _colour(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None]


def render_tile(image: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
                grid: tuple[int, int], scale: int = 1) -> torch.Tensor:
    """One image ``uint8 [3, H, W]`` with its masks (``context [N]``, ``targets [M, N]``) drawn.

    Returns ``uint8 [3, H * scale, W * scale]`` (nearest upscaling: patches stay sharp squares).
    """
    base = image.float().repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    patch_px = base.shape[1] // grid[0]
    if base.shape[1] != grid[0] * patch_px or base.shape[2] != grid[1] * patch_px:
        raise ValueError(f"image {tuple(image.shape)} is not a {grid[0]}x{grid[1]} grid of square patches")
    out = base * HIDDEN_SCALE
    ctx = _upsample(context, grid, patch_px)
    out = torch.where(ctx, base * (1 - CONTEXT_ALPHA) + CONTEXT_ALPHA * _colour(CONTEXT_COLOUR), out)
    for j, target in enumerate(targets):
        colour = _colour(TARGET_COLOURS[j % len(TARGET_COLOURS)])
        out = torch.where(_upsample(target, grid, patch_px), base * (1 - TARGET_ALPHA) + TARGET_ALPHA * colour, out)
    # Outlines last, so every block's border stays visible.
    return draw_outlines(out.round().clamp(0, 255).to(torch.uint8), targets, grid, patch_px)


def draw_outlines(tile: torch.Tensor, targets: torch.Tensor, grid: tuple[int, int], patch_px: int) -> torch.Tensor:
    """Each target block's bounding box on ``uint8 [3, H, W]``, in its colour, a later one on top.

    The lines (``max(2, patch_px // 8)`` pixels) lie inside the box, so they cover the block's own
    border patches and never its neighbours'.
    """
    from torchvision.utils import draw_bounding_boxes  # imported here: torchvision is slow to import

    boxes, colours = [], []
    for j, target in enumerate(targets):
        box = bounding_box(target, grid)
        if box is not None:
            top, left, h, w = (v * patch_px for v in box)
            boxes.append([left, top, left + w - 1, top + h - 1])  # (x0, y0, x1, y1), corners included
            colours.append(TARGET_COLOURS[j % len(TARGET_COLOURS)])
    if not boxes:  # draw_bounding_boxes warns on an empty list
        return tile
    return draw_bounding_boxes(tile, torch.tensor(boxes), colors=colours, width=max(2, patch_px // 8))


def grid_shape(num_images: int, ncols: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the tile grid: about square, at most 8 columns."""
    cols = ncols or min(8, math.ceil(math.sqrt(num_images)))
    return math.ceil(num_images / cols), cols


def tile_origin(index: int, tile_hw: tuple[int, int], ncols: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of tile ``index`` in a grid made by ``render_grid``."""
    row, col = divmod(index, ncols)
    return GAP + row * (tile_hw[0] + GAP), GAP + col * (tile_hw[1] + GAP)


def render_grid(images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
                grid: tuple[int, int], scale: int = 1, ncols: int | None = None) -> torch.Tensor:
    """``uint8 [3, H, W]`` grid of ``render_tile`` for ``images [B, 3, h, w]`` (uint8),
    ``context [B, N]`` and ``targets [M, B, N]`` (bool), on a white background."""
    count = images.shape[0]
    rows, cols = grid_shape(count, ncols)
    tile_hw = (images.shape[2] * scale, images.shape[3] * scale)
    canvas = torch.full((3, GAP + rows * (tile_hw[0] + GAP), GAP + cols * (tile_hw[1] + GAP)), 255, dtype=torch.uint8)
    for i in range(count):
        y, x = tile_origin(i, tile_hw, cols)
        canvas[:, y:y + tile_hw[0], x:x + tile_hw[1]] = render_tile(images[i], context[i], targets[:, i], grid, scale)
    return canvas


def mask_grid_from_batch(images: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor,
                         patch_size: int, max_images: int = 8, tile_px: int = 128) -> torch.Tensor:
    """The grid for a training batch (uint8 images ``[B, 3, H, W]``, index masks ``[M, B, K]``), CHW uint8.

    Cheap enough to call from the training loop: at most ``max_images`` images, tiles of about
    ``tile_px`` pixels, no matplotlib.
    """
    n = min(max_images, images.shape[0])
    grid = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    num_patches = grid[0] * grid[1]
    context = indices_to_bool(masks_enc[:, :n], num_patches).any(0)  # union of the context masks
    targets = indices_to_bool(masks_pred[:, :n], num_patches)
    scale = max(1, round(tile_px / images.shape[2]))
    return render_grid(images[:n], context, targets, grid, scale)


def describe_masks(blocks, collator, step: int, kept: int) -> str:
    """Title text: the block sizes the collator drew for this batch."""
    (ph, pw), (eh, ew) = blocks.pred_size, blocks.enc_size
    gh, gw = collator.grid
    relaxed = int((blocks.relaxed > 0).sum())
    text = (f"step {step}, seed {collator.seed}, {gh}x{gw} patch grid: {collator.npred} target blocks of "
            f"{ph}x{pw} (h x w) patches (scale {blocks.pred_scale:.3f}, aspect {blocks.pred_aspect:.2f}); "
            f"context block {eh}x{ew} (scale {blocks.enc_scale:.3f}) keeps {kept} of {gh * gw} "
            f"patches after removing the targets")
    if relaxed:
        text += f"; {relaxed} image(s) kept some target patches in the context (min_keep)"
    return text + ". Blue: context; colours: target blocks; dark: neither."


def save_png(grid: torch.Tensor, title: str, out: str | Path) -> int:
    """Write ``grid`` under a wrapped title band; returns the band's height in pixels."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    height, width = grid.shape[1:]
    chars = max(30, width // 7)  # ~7 px per character at 9 pt and 100 dpi
    lines = textwrap.wrap(title, chars)
    band = LINE_PX * len(lines) + 10
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, (height + band) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + band)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5, 1 - 5 / (height + band), "\n".join(lines), ha="center", va="top", fontsize=9,
             linespacing=1.2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return band


