"""Frozen-feature extraction: one feature vector per image from a pretrained encoder.

Pooling (``pool``):

* ``mean`` (default): the mean over patch tokens of the encoder's output, i.e. of the last
  block's tokens after the encoder's final LayerNorm. This is I-JEPA's linear-probe input (the
  encoder has no class token).
* ``lastn``: the concatenation, earliest block first, of the mean-pooled tokens of the last
  ``last_n`` blocks, each passed through the encoder's final LayerNorm first (as DINO's
  ``get_intermediate_layers`` and I-JEPA's low-level evaluations do): raw intermediate tokens have
  very different scales from block to block, and the norm puts every part on the scale of the
  final output. ``lastn`` with ``last_n=1`` equals ``mean``. The block outputs are taken with
  forward hooks, so the encoder's own forward runs unchanged.

Order and processes: images are processed in the deterministic order of
:mod:`pijepa.eval.datasets`, in global batches of ``batch_size`` consecutive images. Under
torchrun each rank takes every ``world``-th batch (rank r: batches r, r + world, ...), so every
batch holds the same images as in one process and the features come out bit-identical whatever
the number of processes (given the same batch size, device and thread count). Rank 0 gathers the
parts over gloo (CPU tensors) and writes the one file; the other ranks write nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pijepa.data.transforms import build_eval_transform
from pijepa.eval.datasets import EvalImages, limit_samples, list_images
from pijepa.eval.features_io import save_features
from pijepa.models.loading import load_encoder
from pijepa.models.vit import VisionTransformer
from pijepa.runtime.errors import ConfigError, DataError, UserError, without_worker_traceback

POOLS = ("mean", "lastn")


# ----------------------------------------------------------------------------- pooling


def check_pool(encoder: VisionTransformer, pool: str, last_n: int) -> None:
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "lastn" and not 1 <= last_n <= len(encoder.blocks):
        raise ConfigError(f"--last-n must be in 1..{len(encoder.blocks)} (the encoder's depth), got {last_n}")


def feature_dim(encoder: VisionTransformer, pool: str, last_n: int) -> int:
    return encoder.embed_dim * (last_n if pool == "lastn" else 1)


@contextlib.contextmanager
def capture_last_blocks(encoder: VisionTransformer, n: int) -> Iterator[list[torch.Tensor]]:
    """Collects the outputs of the encoder's last ``n`` blocks during the forwards run inside."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for block in encoder.blocks[-n:]]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def encode_batch(encoder: VisionTransformer, images: torch.Tensor, pool: str = "mean", last_n: int = 4) -> torch.Tensor:
    """``[B, 3, H, W] -> [B, F]`` float32 features (see the module docstring for ``pool``)."""
    if pool == "mean":
        return encoder(images).float().mean(dim=1)
    check_pool(encoder, pool, last_n)
    with capture_last_blocks(encoder, last_n) as outputs:
        encoder(images)
    return torch.cat([encoder.norm(out).float().mean(dim=1) for out in outputs], dim=1)


# ----------------------------------------------------------------------------- splitting over ranks


def rank_indices(num_samples: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Sample indices of ``rank``: the global batches ``rank, rank + world, ...``, in order."""
    out: list[int] = []
    for start in range(rank * batch_size, num_samples, world * batch_size):
        out.extend(range(start, min(start + batch_size, num_samples)))
    return out


def assemble(parts: list[torch.Tensor], num_samples: int, batch_size: int) -> torch.Tensor:
    """Put the ranks' parts (rank order, as ``rank_indices`` made them) back into sample order."""
    world = len(parts)
    order = torch.tensor([i for r in range(world) for i in rank_indices(num_samples, batch_size, r, world)],
                         dtype=torch.long)
    stacked = torch.cat(parts)
    if stacked.shape[0] != num_samples:
        raise RuntimeError(f"gathered {stacked.shape[0]} feature rows, expected {num_samples}")
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out


def gather_to_main(local: torch.Tensor, counts: list[int], rank: int, world: int) -> list[torch.Tensor] | None:
    """Every rank's ``[count_r, F]`` CPU tensor on rank 0 (None elsewhere), via gloo ``gather``.

    ``gather`` needs equal shapes, so parts are padded to the largest count and cut after.
    """
    if world == 1:
        return [local]
    width = max(counts)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype)
    padded[: local.shape[0]] = local
    if rank != 0:
        dist.gather(padded, None, dst=0)
        return None
    bucket = [torch.empty_like(padded) for _ in range(world)]
    dist.gather(padded, bucket, dst=0)
    return [part[:n] for part, n in zip(bucket, counts)]


@contextlib.contextmanager
def distributed_context() -> Iterator[tuple[int, int]]:
    """(rank, world) from torchrun's environment; a gloo group is created (and closed) if needed.

    gloo, not NCCL, even on GPUs: only the finished CPU features travel, once.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        yield rank, world
    finally:
        if created:
            dist.destroy_process_group()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        # Modulo: several ranks may share one GPU (a small machine, a test).
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract(
    encoder: VisionTransformer,
    dataset: torch.utils.data.Dataset,
    indices: list[int],
    *,
    batch_size: int,
    workers: int = 0,
    pool: str = "mean",
    last_n: int = 4,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Features ``[len(indices), F]`` (float32, CPU) of ``dataset[i]`` for ``i`` in ``indices``."""
    device = next(encoder.parameters()).device
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    out = torch.empty(len(indices), feature_dim(encoder, pool, last_n))
    row = 0
    try:
        for images, _labels in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            feats = encode_batch(encoder, images.to(device, non_blocking=True), pool, last_n)
            out[row: row + feats.shape[0]] = feats.cpu()
            row += feats.shape[0]
    except UserError as e:
        raise without_worker_traceback(e) from None
    return out


def eval_image_size(encoder: VisionTransformer, img_size: int | None) -> int:
    """The eval crop: ``img_size`` if given, else the encoder's (square) training size."""
    if img_size is None:
        h, w = encoder.img_size
        if h != w:
            raise ConfigError(f"the encoder was trained at {h}x{w}; pass --img-size for a square eval crop")
        img_size = h
    if img_size < 1 or img_size % encoder.patch_size:
        raise ConfigError(f"--img-size {img_size} must be a positive multiple of the patch size "
                          f"{encoder.patch_size}")
    return img_size


def extract_features(
    encoder_path: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str = "target",
    pool: str = "mean",
    last_n: int = 4,
    batch_size: int = 64,
    img_size: int | None = None,
    workers: int = 2,
    limit: int | None = None,
    device: str | torch.device | None = None,
    attn_backend: str = "sdpa",
    progress: bool = True,
) -> dict[str, Any] | None:
    """Extract and write a feature file; returns its summary on rank 0 and None on other ranks."""
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"need --batch-size >= 1 and --workers >= 0, got {batch_size}, {workers}")
    # Everything that can fail on bad input happens before any process group exists, on every
    # rank alike, so a bad argument stops all ranks with the same message and no hang.
    listing = list_images(data)
    samples = limit_samples(listing.samples, limit)
    if not samples:
        raise DataError(f"{data}: no images found")
    device = torch.device(device) if device is not None else default_device()
    encoder = load_encoder(encoder_path, which=which, device=device, attn_backend=attn_backend)
    check_pool(encoder, pool, last_n)
    size = eval_image_size(encoder, img_size)
    dataset = EvalImages(samples, build_eval_transform(size))

    with distributed_context() as (rank, world):
        counts = [len(rank_indices(len(samples), batch_size, r, world)) for r in range(world)]
        local = extract(encoder, dataset, rank_indices(len(samples), batch_size, rank, world),
                        batch_size=batch_size, workers=workers, pool=pool, last_n=last_n,
                        progress=progress and rank == 0, desc=f"features {Path(data).name}")
        parts = gather_to_main(local, counts, rank, world)
        summary = None
        if parts is not None:  # rank 0
            features = assemble(parts, len(samples), batch_size)
            labels = torch.tensor([s.label for s in samples], dtype=torch.long)
            meta = {
                "encoder": str(encoder_path), "which": which, "pool": pool,
                "last_n": last_n if pool == "lastn" else None, "img_size": size, "data": str(data),
                "layout": listing.layout, "limit": limit, "batch_size": batch_size,
                "model": {"embed_dim": encoder.embed_dim, "depth": encoder.depth,
                          "patch_size": encoder.patch_size, "img_size": list(encoder.img_size)},
            }
            save_features(out, features, labels, listing.classes, meta)
            summary = {"out": str(out), "num_samples": len(samples), "dim": features.shape[1],
                       "num_classes": len(listing.classes), "skipped": listing.skipped}
        if world > 1:
            dist.barrier()  # the file exists on every rank's return
        return summary
