"""`pijepa viz masks`: a PNG grid of a config's images with the context and target blocks its
collator draws (the drawing itself is pijepa.masks.viz)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from pijepa.commands._args import add_config_arguments, check
from pijepa.config import load_config
from pijepa.masks.viz import BLANK_GREY, describe_masks, grid_shape, indices_to_bool, render_grid, save_png
from pijepa.runtime.log import console

# ----------------------------------------------------------------------------- images of a config


def _display_transform(crop: int) -> v2.Compose:
    return v2.Compose([v2.Resize(crop, antialias=True), v2.CenterCrop(crop)])


def _images_from_path(path: Path, n: int) -> list[torch.Tensor]:
    """Up to ``n`` images spread over the first classes (folder, tars) or the first shard."""
    from pijepa.eval import datasets as ds

    layout = ds.detect_eval_layout(path)
    if layout == "shards":
        folder = path.parent if path.is_file() else path
        index = ds.read_index(path)
        samples = [s for _, s in sorted(ds.scan_shard(folder / index["shards"][0]["name"],
                                                      len(index["classes"])), key=lambda t: t[0])]
    else:
        containers, _ = ds.class_containers(path, layout)
        per_class = math.ceil(n / max(1, min(len(containers), n)))
        samples = []
        for label, container in enumerate(containers):
            samples += ds.scan_class(path, layout, container, label)[0][:per_class]
            if len(samples) >= n:
                break
    return [ds.decode_sample(s) for s in samples[:n]]


def config_images(cfg, n: int) -> tuple[torch.Tensor, str | None]:
    """``uint8 [n, 3, crop, crop]`` images from the config's dataset, and a note when the data
    could not be read and blank images stand in for it."""
    d = cfg.data
    crop = d.crop_size
    if d.dataset == "synthetic":
        from pijepa.data.synthetic import SyntheticShapes

        shapes = SyntheticShapes(n, d.synthetic_classes, image_size=crop, seed=cfg.meta.seed)
        return torch.stack([shapes[i][0] for i in range(n)]), None
    path = Path(d.root_path) / d.image_folder if d.dataset == "folder" else Path(d.shards)
    note = None
    images: list[torch.Tensor] = []
    if path.exists():
        try:
            images = _images_from_path(path, n)
        except (OSError, RuntimeError, ValueError) as e:
            note = f"cannot read images from {path} ({e})"
    else:
        note = f"data path {path} does not exist"
    if not images:
        note = note or f"no images found in {path}"
        return torch.full((n, 3, crop, crop), BLANK_GREY, dtype=torch.uint8), note + "; blank images shown"
    transform = _display_transform(crop)
    images = [transform(im) for im in images]
    while len(images) < n:  # fewer images than asked for: repeat them (the masks still differ)
        images.append(images[len(images) % max(1, len(images))])
    return torch.stack(images), None


# ----------------------------------------------------------------------------- the PNG


def masks_figure(cfg, num_images: int = 8, step: int = 0) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """(grid CHW uint8, title, info) for ``num_images`` images and the masks of ``step``."""
    from pijepa.masks.multiblock import masks_to_indices
    from pijepa.train.build import build_collator

    collator = build_collator(cfg)
    blocks = collator.sample_block_masks(num_images, step)
    # The context as the encoder gets it: the collator's index masks, cut to the batch minimum.
    enc_idx = masks_to_indices(blocks.enc)
    context = indices_to_bool(enc_idx, collator.num_patches).any(0)
    images, note = config_images(cfg, num_images)
    crop = cfg.data.crop_size
    scale = max(1, round(192 / crop))
    grid = render_grid(images, context, blocks.pred, collator.grid, scale)
    title = describe_masks(blocks, collator, step, enc_idx.shape[-1])
    if note:
        title = f"[{note}] " + title
    info = {"blocks": blocks, "context": context, "scale": scale, "note": note,
            "tile_hw": (crop * scale, crop * scale), "ncols": grid_shape(num_images)[1]}
    return grid, title, info


def add_viz_masks_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(parser, what="its mask settings are drawn")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--images", type=int, default=8, help="images in the grid (default 8)")
    parser.add_argument("--step", type=int, default=0, help="training step whose masks to draw (default 0)")
    return parser


def run_viz_masks(args: argparse.Namespace) -> None:
    check(1 <= args.images <= 256, f"--images must be in 1..256, got {args.images}")
    check(args.step >= 0, f"--step must be >= 0, got {args.step}")
    cfg = load_config(args.config, args.overrides)
    grid, title, info = masks_figure(cfg, args.images, args.step)
    save_png(grid, title, args.out)
    if info["note"]:
        console(f"pijepa viz masks: {info['note']}")
    console(f"pijepa viz masks: wrote {args.out}")


def register(commands: argparse._SubParsersAction) -> None:
    viz = commands.add_parser("viz", help="pictures: the masks a config draws")
    sub = viz.add_subparsers(dest="viz_command", required=True, metavar="SUBCOMMAND")
    masks = sub.add_parser("masks", help="a PNG grid of images with their context and target blocks")
    add_viz_masks_arguments(masks)
    masks.set_defaults(run=run_viz_masks, command_name="viz masks")
