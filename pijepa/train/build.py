"""Small builders from the config: models, loss, dataset, collator, loader."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pijepa.config import Config
from pijepa.data.folder import image_folder
from pijepa.data.loader import build_step_loader, dataset_len
from pijepa.data.synthetic import SyntheticShapes
from pijepa.data.transforms import build_train_transform
from pijepa.data.wds import ShardSet, build_wds_loader, check_readers, resolve_shards
from pijepa.losses import build_loss
from pijepa.masks import MultiBlockMaskCollator
from pijepa.models import build_encoder, build_predictor
from pijepa.parallel import RunShape, Strategy, build_strategy
from pijepa.parallel import options as parallel_options
from pijepa.parallel.base import JEPAModels

# What a run trains on: a map-style dataset, or (webdataset) the resolved shard list.
TrainData = Dataset | ShardSet


def build_models(cfg: Config, device: str = "cpu") -> JEPAModels:
    """Encoder, predictor and an exact copy of the encoder as EMA target (same init, same seed).

    `device` "meta" builds them without storage or weights, for a strategy that `builds_on_meta`:
    its setup draws the weights into its shards, equal bit for bit to the ones built here on the
    CPU (from `init_rng`, the generator state after seeding; see pijepa/models/init.py)."""
    torch.manual_seed(cfg.meta.seed)
    init_rng = torch.get_rng_state() if device == "meta" else None
    with torch.device(device):
        encoder = build_encoder(cfg.meta.model_name, patch_size=cfg.mask.patch_size, img_size=cfg.data.crop_size,
                                attn_backend=cfg.meta.attn_backend, depth=cfg.meta.encoder_depth,
                                depth_scaled_init=cfg.meta.weight_init == "depth_scaled")
        predictor = build_predictor(encoder, pred_depth=cfg.meta.pred_depth, pred_emb_dim=cfg.meta.pred_emb_dim)
    target = copy.deepcopy(encoder)  # on meta: no copy of any weights
    target.requires_grad_(False)
    return JEPAModels(encoder, predictor, target, init_rng=init_rng)


def build_models_for(cfg: Config, strategy: Strategy) -> JEPAModels:
    """`build_models` on the device that `strategy.setup` wants them on (meta, or built on the CPU)."""
    return build_models(cfg, "meta" if strategy.builds_on_meta else "cpu")


def model_entry(cfg: Config) -> dict:
    """The ``model`` description saved with every checkpoint and export, so that
    ``pijepa.load_encoder`` can rebuild the encoder without the config."""
    m = cfg.meta
    entry = {"model_name": m.model_name, "patch_size": cfg.mask.patch_size, "img_size": cfg.data.crop_size,
             "pred_depth": m.pred_depth, "pred_emb_dim": m.pred_emb_dim}
    if m.encoder_depth:
        entry["depth"] = m.encoder_depth
    return entry


def build_loss_fn(cfg: Config, device: torch.device | None = None):
    o = cfg.optimization
    return build_loss(o.loss_function, grouping=o.pkt_grouping, chunk_size=o.pkt_chunk_size,
                      l2_weight=o.l2_weight, pkt_weight=o.pkt_weight, fused=use_fused_loss(cfg, device))


def use_fused_loss(cfg: Config, device: torch.device | None) -> bool:
    """optimization.fused_loss, with `auto` resolved to the faster path measured for the device."""
    o = cfg.optimization
    if isinstance(o.fused_loss, bool):
        return o.fused_loss
    return (device is not None and device.type == "cuda") or o.pkt_grouping == "image"


def build_collator(cfg: Config) -> MultiBlockMaskCollator:
    k = cfg.mask
    return MultiBlockMaskCollator(
        input_size=cfg.data.crop_size, patch_size=k.patch_size, enc_mask_scale=k.enc_mask_scale,
        pred_mask_scale=k.pred_mask_scale, aspect_ratio=k.aspect_ratio, nenc=k.num_enc_masks,
        npred=k.num_pred_masks, min_keep=k.min_keep, allow_overlap=k.allow_overlap,
        placement=k.placement, seed=cfg.meta.seed)


def build_dataset(cfg: Config, world_size: int = 1) -> TrainData:
    """The map-style dataset, or for webdataset the resolved shard list (its len() is one epoch),
    checked up front so that bad shard settings stop the run before anything is written."""
    d = cfg.data
    if d.dataset == "webdataset":
        shards = resolve_shards(d.shards, d.epoch_samples)
        check_readers(shards, d.wds_mode, world_size, d.num_workers)
        return shards
    if d.dataset == "synthetic":
        # Rendered a little larger than the crop so that RandomResizedCrop has pixels to resample.
        return SyntheticShapes(d.synthetic_images, d.synthetic_classes,
                               image_size=max(d.crop_size, round(d.crop_size * 1.25)), seed=cfg.meta.seed)
    if d.dataset == "folder":
        return image_folder(Path(d.root_path) / d.image_folder)
    raise ValueError(f"data.dataset {d.dataset!r} has no map-style loader")  # a bug: config validates names


def epoch_samples(dataset: TrainData) -> int:
    """Samples in one epoch: len() of the shard list (its indexed or configured epoch) or of the
    map-style dataset."""
    return len(dataset) if isinstance(dataset, ShardSet) else dataset_len(dataset)


def build_train_loader(cfg: Config, dataset: TrainData, *, accum: int, world_size: int, rank: int,
                       start_step: int, total_steps: int, pin_memory: bool):
    d = cfg.data
    transform = build_train_transform(d.crop_size, d.crop_scale, d.use_horizontal_flip,
                                      d.use_color_distortion, d.color_jitter_strength, d.use_gaussian_blur)
    if isinstance(dataset, ShardSet):  # data.dataset: webdataset
        steps_per_epoch = len(dataset) // (d.micro_batch * accum * world_size)
        return build_wds_loader(dataset, transform, build_collator(cfg), mode=d.wds_mode, batch_size=d.micro_batch,
                                accum=accum, world_size=world_size, rank=rank, start_step=start_step,
                                steps_per_epoch=steps_per_epoch, seed=cfg.meta.seed, num_workers=d.num_workers,
                                shuffle_buffer=d.shuffle_buffer, pin_memory=pin_memory)
    return build_step_loader(dataset, transform, build_collator(cfg), batch_size=d.micro_batch,
                             accum=accum, world_size=world_size, rank=rank, start_step=start_step,
                             total_steps=total_steps, seed=cfg.meta.seed, num_workers=d.num_workers,
                             pin_memory=pin_memory)


# A loader may keep a position and counters of its own (the webdataset loader does; the step-addressed
# map-style loader needs none: its position is the step). These read them without knowing the kind.


def loader_state(loader) -> dict | None:
    """The loader's position for the checkpoint (a collective call on every rank), or None."""
    return loader.state_dict() if hasattr(loader, "state_dict") else None


def restore_loader_state(loader, state: dict | None) -> None:
    if state is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state)


def loader_counters(loader) -> dict[str, int]:
    """Cumulative per-rank counters to log (e.g. data_skipped), or {}."""
    return loader.counters() if hasattr(loader, "counters") else {}


def steps_per_epoch(dataset_len: int, global_batch: int) -> int:
    return dataset_len // global_batch


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step so that batch_size x accum x world = global_batch_size."""
    return parallel_options.accumulation_steps(cfg.data.micro_batch, cfg.data.global_batch_size, world_size)


def run_shape(cfg: Config) -> RunShape:
    d = cfg.data
    return RunShape(bf16=cfg.meta.use_bfloat16, micro_batch=d.micro_batch, global_batch=d.global_batch_size,
                    clip_grad=cfg.optimization.clip_grad)


def build_strategy_for(cfg: Config) -> Strategy:
    return build_strategy(cfg.dist, run_shape(cfg))
