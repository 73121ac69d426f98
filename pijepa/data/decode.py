"""Encoded image -> uint8 RGB [3, H, W], with TorchCodec: the one decoder of every data path
(webdataset samples, ImageFolder files, evaluation tars).

torchvision 0.29 deprecates its image I/O in favour of TorchCodec (from 0.16, pinned in setup.py to
the release built against the pinned torch). TorchCodec decodes JPEG (also CMYK and greyscale),
PNG, WebP, GIF, AVIF and HEIC to the pixels torchvision gave (16-bit PNGs scaled to 8 bits within
one level of torchvision's rounding; tests/unit/test_decode.py), and JPEG on a GPU as well
(`device="cuda"`, nvJPEG).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchcodec.decoders import decode_image

from pijepa.runtime.errors import DataError


def decode_rgb(source: bytes | str | Path, where: str | None = None) -> torch.Tensor:
    """`source` (encoded bytes, or a file path) as uint8 RGB [3, H, W]; an undecodable one is a
    DataError naming `where` (default: the path) and the decoder's reason, in one line."""
    try:
        image = decode_image(source, mode="RGB")
    except (RuntimeError, ValueError) as e:  # not an image, truncated, an unsupported format
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = where or ("image bytes" if isinstance(source, bytes) else str(source))
        raise DataError(f"{name}: cannot decode image ({reason})") from None
    if image.ndim == 4:  # an animated GIF / WebP: its first frame
        image = image[0]
    return image
