"""ImageFolder trees (`root/<class>/<image>`) decoded (pijepa.data.decode) to uint8 CHW tensors."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from pijepa.data.decode import decode_rgb
from pijepa.runtime.errors import DataError


def image_folder(root: str | Path) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (expected an ImageFolder tree "
                        f"root/<class>/<image>)")
    return ImageFolder(str(root), loader=decode_rgb)
