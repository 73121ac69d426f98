"""A built-in, deterministic, labelled synthetic image dataset (no download).

Each image is a textured background with one foreground shape; the class is the pair (shape,
fill pattern), so that telling classes apart needs spatial structure (outline, corners, stripes),
not a colour statistic: colours, positions, sizes and backgrounds are random and shared by all
classes. Image `i` is a pure function of `(seed, i)`, so every rank and worker sees the same data.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from pijepa.runtime.errors import ConfigError

SHAPES = ("disk", "square", "triangle", "ring", "cross")
FILLS = ("solid", "striped")


class SyntheticShapes(Dataset):
    """`len(self)` images of `image_size` pixels, uint8 CHW tensors, with integer labels."""

    def __init__(self, num_images: int, num_classes: int = 10, image_size: int = 64, seed: int = 0):
        if not 2 <= num_classes <= len(SHAPES) * len(FILLS):
            raise ConfigError(f"synthetic_classes must be 2..{len(SHAPES) * len(FILLS)}, got {num_classes}")
        self.num_images = num_images
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.classes = [f"{SHAPES[c % len(SHAPES)]}_{FILLS[c // len(SHAPES)]}" for c in range(num_classes)]
        ys, xs = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
        self._grid = (ys.float() + 0.5) / image_size, (xs.float() + 0.5) / image_size

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        return self._render(label, g), label

    def _render(self, label: int, g: torch.Generator) -> torch.Tensor:
        y, x = self._grid
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        # Background: a random two-colour gradient plus low-amplitude noise.
        c0, c1, angle = u(3, 1, 1), u(3, 1, 1), u(1) * 2 * math.pi
        t = (x * torch.cos(angle) + y * torch.sin(angle)).clamp(0, 1)
        image = c0 * (1 - t) + c1 * t + 0.08 * (u(3, *x.shape) - 0.5)
        # Foreground: shape of random size, position, rotation-free, contrasting colour.
        r = 0.18 + 0.17 * u(1)
        cy, cx = r + (1 - 2 * r) * u(1), r + (1 - 2 * r) * u(1)
        dy, dx = (y - cy) / r, (x - cx) / r
        shape = SHAPES[label % len(SHAPES)]
        if shape == "disk":
            inside = dy**2 + dx**2 <= 1
        elif shape == "square":
            inside = (dy.abs() <= 0.8) & (dx.abs() <= 0.8)
        elif shape == "triangle":
            inside = (dy <= 0.8) & (dy >= -0.9 + 2 * dx.abs())
        elif shape == "ring":
            d2 = dy**2 + dx**2
            inside = (d2 <= 1) & (d2 >= 0.45)
        else:
            inside = ((dy.abs() <= 0.3) & (dx.abs() <= 1)) | ((dx.abs() <= 0.3) & (dy.abs() <= 1))
        if FILLS[label // len(SHAPES)] == "striped":
            period = 0.25 + 0.1 * u(1)
            inside = inside & (torch.remainder(dx + dy, period * 2) < period)
        colour = (1 - c0.mean() + 0.5 * (u(3, 1, 1) - 0.5)).clamp(0, 1)
        image = torch.where(inside, colour.expand_as(image), image)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8)
