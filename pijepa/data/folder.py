"""ImageFolder trees (`root/<class>/<image>`) decoded with torchvision to uint8 CHW tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import to_dtype

from pijepa.runtime.errors import DataError


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit images (PNG) decode to uint16: scaled to uint8 like every other image."""
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def decode_rgb(path: str) -> torch.Tensor:
    """Any image torchvision decodes (JPEG, PNG, greyscale, CMYK, alpha) as 3-channel uint8."""
    try:
        return as_uint8(decode_image(read_file(path), mode=ImageReadMode.RGB))
    except RuntimeError as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def image_folder(root: str | Path) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (expected an ImageFolder tree "
                        f"root/<class>/<image>)")
    return ImageFolder(str(root), loader=decode_rgb)
