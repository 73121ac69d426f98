"""Image bytes for the shard writer, with PIL: the full-decode check, RGB conversion and JPEG
(re-)encoding behind the image policy described in :mod:`pijepa.data.shards`."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile

JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: camera JPEGs with extra frames, still plain JPEG
JPEG_QUALITY = 95


class UndecodableImage(Exception):
    pass


@contextmanager
def strict_decoding() -> Iterator[None]:
    # Some code sets PIL's global LOAD_TRUNCATED_IMAGES; a truncated file must still fail here.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any PIL mode: alpha composited onto white, 16-bit greyscale scaled (not clipped)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if im.mode.startswith("I") else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def encode_jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    to_rgb(im).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def prepare_image(data: bytes, reencode: bool) -> tuple[bytes, str | None]:
    """Decode fully (the check), then return (bytes for `jpg`, transcoding note or None)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format or "unknown"
            if reencode:
                return encode_jpeg(im), None
            if fmt in JPEG_FORMATS:
                return data, None
            return encode_jpeg(im), f"{fmt} image transcoded to RGB JPEG"
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise UndecodableImage(f"cannot decode: {type(err).__name__}: {err}") from err
