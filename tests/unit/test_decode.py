"""TorchCodec decoding gives the pixels torchvision's (deprecated) image I/O gave, for every kind of
image the data paths meet; an undecodable one is one DataError line."""

import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pijepa.data.decode import decode_rgb
from pijepa.runtime.errors import DataError
from tests.conftest import DATA


def torchvision_rgb(data: bytes) -> torch.Tensor:
    """The reference: torchvision 0.29's decoder (deprecated, hence the silenced warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import to_dtype

        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def encoded(mode: str, fmt: str, size=(20, 14)) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        pixels = rng.integers(0, 255, (*size[::-1], bands), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode=mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"),
                                       ("RGBA", "PNG"), ("L", "PNG"), ("I;16", "PNG"), ("P", "PNG")])
def test_same_pixels_as_torchvision(mode, fmt):
    data = encoded(mode, fmt)
    got = decode_rgb(data)
    assert got.dtype == torch.uint8 and got.shape == (3, 14, 20)
    want = torchvision_rgb(data)
    if mode == "I;16":  # 16 -> 8 bits: TorchCodec and torchvision's to_dtype round differently
        assert (got.int() - want.int()).abs().max() <= 1
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dataset", ["cifar10", "intel-scenes"])
def test_real_images_match(dataset):
    tar_path = sorted((DATA / dataset / "train").glob("*.tar"))[0]
    with tarfile.open(tar_path) as tf:
        members = [m for m in tf if m.isfile()][:20]
        for m in members:
            data = tf.extractfile(m).read()
            assert torch.equal(decode_rgb(data, m.name), torchvision_rgb(data)), m.name


def test_undecodable_is_one_line(tmp_path):
    for data in (b"not an image", encoded("RGB", "JPEG")[:60]):
        with pytest.raises(DataError, match=r"^x.jpg: cannot decode image \(") as e:
            decode_rgb(data, "x.jpg")
        assert "\n" not in str(e.value)
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: cannot decode image"):
        decode_rgb(path)


def test_normalize_batch_equals_the_per_image_transform():
    """Training batches travel as uint8 crops and are normalised on the trainer's device."""
    from torchvision.transforms import v2

    from pijepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    per_image = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.equal(normalize_batch(images), torch.stack([per_image(x) for x in images]))
