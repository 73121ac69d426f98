"""Image transforms on uint8 CHW tensors (torchvision v2), shared by every dataset."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_seed(seed: int, u: int, i: int) -> int:
    """The seed of one image's augmentation: a pure function of the run's seed, the micro-batch
    index `u` and `i` (the dataset index in the step-addressed loader, the place in the batch in the
    webdataset loader), so that a crop never depends on the process or worker that makes it."""
    return (seed * 1_000_003 + u) * 1_000_033 + i


def build_train_transform(
    crop_size: int,
    crop_scale: tuple[float, float],
    horizontal_flip: bool = False,
    color_distortion: bool = False,
    color_jitter_strength: float = 0.0,
    gaussian_blur: bool = False,
) -> v2.Compose:
    """I-JEPA's pretraining augmentation: RandomResizedCrop (+ optional flip, colour, blur)."""
    steps: list = [v2.RandomResizedCrop(crop_size, scale=crop_scale, antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_distortion:  # SimCLR-style distortion, as I-JEPA's optional one
        s = color_jitter_strength
        steps += [v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                  v2.RandomGrayscale(p=0.2)]
    if gaussian_blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def build_eval_transform(crop_size: int) -> v2.Compose:
    """Resize the shorter side (crop_size * 256/224) and centre-crop, as ImageNet evaluation does."""
    resize = int(round(crop_size * 256 / 224))
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of training batches: float ``[B, 3, H, W]`` -> uint8."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((images.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
