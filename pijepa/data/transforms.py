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
    """I-JEPA's pretraining augmentation: RandomResizedCrop (+ optional flip, colour, blur), on
    uint8 images and to uint8 crops: a worker sends a quarter of float32's bytes to the trainer,
    which scales and normalises whole batches on its device (`normalize_batch`), the same ops."""
    steps: list = [v2.RandomResizedCrop(crop_size, scale=crop_scale, antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_distortion:  # SimCLR-style distortion, as I-JEPA's optional one
        s = color_jitter_strength
        steps += [v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                  v2.RandomGrayscale(p=0.2)]
    if gaussian_blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(steps)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 crops [B, 3, H, W] -> float32 in [0, 1], ImageNet-normalised: what the evaluation
    transform does per image (`v2.ToDtype(scale=True)`, `v2.Normalize`), for a batch on any device."""
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True),
                                   list(IMAGENET_MEAN), list(IMAGENET_STD))


def build_eval_transform(crop_size: int) -> v2.Compose:
    """Resize the shorter side (crop_size * 256/224) and centre-crop, as ImageNet evaluation does."""
    resize = int(round(crop_size * 256 / 224))
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
