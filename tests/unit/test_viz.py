"""Mask pictures (pijepa/masks/viz.py): pixels where the collator's masks say, PNG and TensorBoard."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from PIL import Image

from pijepa.cli import main
from pijepa.commands import viz as viz_command
from pijepa.config import ConfigError, load_config
from pijepa.masks import viz
from pijepa.masks.multiblock import masks_to_indices
from pijepa.train.build import build_collator
from tests.conftest import REPO, TINY_OVERRIDES

HIDDEN, CONTEXT = -2, -1  # expected "classes" of a patch; targets are 0..M-1


def expected_classes(context: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, N]: the last target holding the patch, else context, else hidden (the drawing order)."""
    out = torch.where(context, CONTEXT, HIDDEN)
    for j, target in enumerate(targets):
        out = torch.where(target, j, out)
    return out


def read_classes(pixels: torch.Tensor, base: torch.Tensor, num_targets: int) -> torch.Tensor:
    """Which tint explains each pixel best: pixels/base float [..., 3] -> class per pixel."""
    def tint(colour, alpha):
        return base * (1 - alpha) + alpha * torch.tensor(colour, dtype=torch.float32)

    candidates = [base * viz.HIDDEN_SCALE, tint(viz.CONTEXT_COLOUR, viz.CONTEXT_ALPHA)]
    candidates += [tint(viz.TARGET_COLOURS[j % len(viz.TARGET_COLOURS)], viz.TARGET_ALPHA) for j in range(num_targets)]
    dist = torch.stack([(pixels - c).norm(dim=-1) for c in candidates])
    return dist.argmin(0) - 2  # index 0 -> HIDDEN, 1 -> CONTEXT, 2 + j -> j


def patch_centres(canvas: torch.Tensor, images: torch.Tensor, grid, scale: int, ncols: int):
    """(canvas pixels, base pixels), both float [B, N, 3], at the centre of every patch of every tile."""
    count, _, h, w = images.shape
    patch_px = h * scale // grid[0]
    rows = torch.arange(grid[0]).repeat_interleave(grid[1]) * patch_px + patch_px // 2
    cols = torch.arange(grid[1]).repeat(grid[0]) * patch_px + patch_px // 2
    pixels, bases = [], []
    for i in range(count):
        y, x = viz.tile_origin(i, (h * scale, w * scale), ncols)
        pixels.append(canvas[:, y + rows, x + cols].T.float())
        bases.append(images[i][:, rows // scale, cols // scale].T.float())
    return torch.stack(pixels), torch.stack(bases)


def test_render_grid_colours_follow_the_masks():
    grid, count = (4, 5), 3
    images = torch.randint(0, 256, (count, 3, 32, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    context = torch.zeros(count, 20, dtype=torch.bool)
    context[:, [0, 1, 5, 6, 7]] = True
    context[2] = False  # an image whose context is empty
    targets = torch.zeros(2, count, 20, dtype=torch.bool)
    targets[0, :, [6, 7, 11, 12]] = True  # overlaps the context: the target is drawn on top
    targets[1, :, [12, 13, 17, 18]] = True  # overlaps target 0 at patch 12: the later one wins
    canvas = viz.render_grid(images, context, targets, grid, scale=3, ncols=2)
    assert canvas.dtype == torch.uint8
    assert canvas.shape == (3, viz.GAP + 2 * (96 + viz.GAP), viz.GAP + 2 * (120 + viz.GAP))
    pixels, bases = patch_centres(canvas, images, grid, 3, 2)
    assert torch.equal(read_classes(pixels, bases, 2), expected_classes(context, targets))
    # Outlines: the top-left pixel of target 1's box (patch 12 -> row 2, col 2) is its pure colour.
    y, x = viz.tile_origin(0, (96, 120), 2)
    assert canvas[:, y + 2 * 24, x + 2 * 24].tolist() == list(viz.TARGET_COLOURS[1])
    assert torch.all(canvas[:, 0, :] == 255)  # white gap around the tiles


@pytest.mark.parametrize("config, blank", [("cpu_default.yaml", False), ("in1k_vith14_ep300.yaml", True)])
def test_viz_masks_png_shows_the_collators_masks(tmp_path, capsys, config, blank):
    n, step = 5, 3
    out = tmp_path / "masks.png"
    assert main(["viz", "masks", "--config", str(REPO / "configs" / config), "--out", str(out),
                 "--images", str(n), "--step", str(step)]) == 0
    err = capsys.readouterr().err
    assert ("blank images shown" in err) == blank

    cfg = load_config(REPO / "configs" / config)
    collator = build_collator(cfg)
    blocks = collator.sample_block_masks(n, step)
    context = torch.zeros(n, collator.num_patches, dtype=torch.bool)
    context.scatter_(1, masks_to_indices(blocks.enc)[0], True)  # what the encoder sees
    images, note = viz_command.config_images(cfg, n)
    assert (note is not None) == blank
    if blank:
        assert torch.all(images == viz.BLANK_GREY)

    png = torch.from_numpy(mpimg.imread(out))[..., :3].mul(255).round()  # [H, W, 3]
    rows, cols = viz.grid_shape(n)
    tile = (png.shape[1] - viz.GAP) // cols - viz.GAP
    scale = tile // cfg.data.crop_size
    grid_h = viz.GAP + rows * (tile + viz.GAP)
    assert png.shape[0] > grid_h  # a title band above the grid
    canvas = png[-grid_h:].permute(2, 0, 1)
    pixels, bases = patch_centres(canvas, images, collator.grid, scale, cols)
    assert torch.equal(read_classes(pixels, bases, collator.npred), expected_classes(context, blocks.pred))

    _, title, _ = viz_command.masks_figure(cfg, n, step)
    (ph, pw), (eh, ew) = blocks.pred_size, blocks.enc_size
    assert f"{collator.npred} target blocks of {ph}x{pw}" in title and f"context block {eh}x{ew}" in title


def test_viz_masks_bad_input(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["viz", "masks", "--config", str(REPO / "configs/cpu_default.yaml"), "--out", str(out),
                 "--set", "mask.min_keep=1000"]) == 2
    assert "mask.min_keep" in capsys.readouterr().err and not out.exists()


def test_mask_viz_freq_is_validated():
    assert load_config(REPO / "configs/cpu_default.yaml").logging.mask_viz_freq == 500
    with pytest.raises(ConfigError, match="logging.mask_viz_freq"):
        load_config(REPO / "configs/cpu_default.yaml", ["logging.mask_viz_freq=-1"])


def logged_images(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    if "masks" not in acc.Tags()["images"]:
        return []
    return acc.Images("masks")


@pytest.mark.parametrize("freq, max_steps, steps", [(2, 3, [2]), (0, 1, [])])
def test_trainer_logs_mask_grid_to_tensorboard(tmp_path, freq, max_steps, steps):
    from pijepa.train.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs/cpu_default.yaml", [
        *TINY_OVERRIDES, f"logging.folder={run_dir}", f"optimization.max_steps={max_steps}",
        "logging.log_freq=4", "logging.checkpoint_freq=100", f"logging.mask_viz_freq={freq}"])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    events = logged_images(run_dir)
    assert [e.step for e in events] == steps  # every freq steps, not every step nor only at the end
    for event in events:
        image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        # 8 images (the micro-batch) of 32 px drawn 4x larger: a 3x3 grid of 128-px tiles.
        side = viz.GAP + 3 * (128 + viz.GAP)
        assert (event.height, event.width) == (side, side) and image.shape == (side, side, 3)
        assert image.astype(float).std() > 10  # a picture, not a blank canvas
