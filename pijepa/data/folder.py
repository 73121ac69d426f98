"""ImageFolder trees (`root/<class>/<image>`) decoded with torchvision to uint8 CHW tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, read_file


def decode_rgb(path: str) -> torch.Tensor:
    """Any image torchvision decodes (JPEG, PNG, greyscale, CMYK, alpha) as 3-channel uint8."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: cannot decode image ({e})") from None


def image_folder(root: str | Path) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected an ImageFolder tree "
                                f"root/<class>/<image>)")
    return ImageFolder(str(root), loader=decode_rgb)
