"""What the plan knows of the model and the masks: parameter counts and tower shapes of the
encoder and predictor built on the meta device (no memory, no weights), and the sequence lengths
the config's mask collator produces."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pijepa.masks import MultiBlockMaskCollator
from pijepa.models import Block, VisionTransformer, VisionTransformerPredictor, build_encoder, build_predictor

if TYPE_CHECKING:
    from pijepa.config import Config

MASK_SAMPLE_STEPS = 8  # collator draws used for the context / target lengths
MASK_DRAW_BATCH = 256  # images per draw at most; larger micro-batches reuse its (longer) context length


# ---------------------------------------------------------------- model shape


@dataclass(frozen=True)
class Tower:
    """A stack of identical pre-norm transformer blocks."""

    width: int
    depth: int
    heads: int
    hidden: int  # MLP width
    block_params: int


@dataclass(frozen=True)
class ModelShape:
    encoder: Tower
    predictor: Tower
    encoder_params: int  # all, frozen positional table included (= the EMA target's size)
    predictor_params: int  # all
    trainable_params: int  # Psi: encoder + predictor parameters with gradients
    encoder_trainable: int
    largest_param: int  # elements of the largest single parameter tensor (CPU optimizer temporaries)
    num_patches: int
    image_size: tuple[int, int]
    patch_size: int
    # Elements of the parameters whose first dimension is 1 (the positional tables, the mask
    # token): FSDP shards dim 0 and pads it to one row per rank, so over S ranks each is
    # gathered S times its size.
    encoder_rows: int = 0
    predictor_rows: int = 0

    @property
    def params(self) -> int:
        return self.encoder_params + self.predictor_params

    def fsdp_padding(self, shards: int, encoder: bool = True, predictor: bool = True) -> int:
        """Elements FSDP adds to a gather of the encoder's and/or predictor's roots over `shards`
        ranks (the one-row parameters padded to `shards` rows)."""
        return (shards - 1) * (encoder * self.encoder_rows + predictor * self.predictor_rows)

    @property
    def root_params(self) -> int:
        """Parameters outside the transformer blocks (FSDP's root unit, kept gathered)."""
        blocks = self.encoder.depth * self.encoder.block_params + self.predictor.depth * self.predictor.block_params
        return self.params - blocks


# meta_models' arguments: (model_name, patch_size, img_size, pred_depth, pred_dim[, encoder_depth]).
ShapeArgs = tuple[str, int, int, int, int] | tuple[str, int, int, int, int, int]


@functools.lru_cache(maxsize=16)
def meta_models(model_name: str, patch_size: int, img_size: int, pred_depth: int, pred_dim: int,
                encoder_depth: int = 0) -> tuple[VisionTransformer, VisionTransformerPredictor]:
    """Encoder and predictor built on the meta device: shapes and counts only, no memory."""
    with torch.device("meta"):
        encoder = build_encoder(model_name, patch_size=patch_size, img_size=img_size, depth=encoder_depth)
        predictor = build_predictor(encoder, pred_depth=pred_depth, pred_emb_dim=pred_dim)
    return encoder, predictor


def tower_of(blocks: torch.nn.ModuleList) -> Tower:
    block = blocks[0]
    assert isinstance(block, Block), type(block)
    return Tower(width=block.norm1.normalized_shape[0], depth=len(blocks), heads=block.attn.num_heads,
                 hidden=block.mlp.fc1.out_features, block_params=sum(p.numel() for p in block.parameters()))


def model_shape(model_name: str, patch_size: int, img_size: int, pred_depth: int, pred_dim: int,
                encoder_depth: int = 0) -> ModelShape:
    encoder, predictor = meta_models(model_name, patch_size, img_size, pred_depth, pred_dim, encoder_depth)
    params = list(encoder.parameters()) + list(predictor.parameters())
    height, width = encoder.img_size
    return ModelShape(
        encoder=tower_of(encoder.blocks), predictor=tower_of(predictor.predictor_blocks),
        encoder_params=sum(p.numel() for p in encoder.parameters()),
        predictor_params=sum(p.numel() for p in predictor.parameters()),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        encoder_trainable=sum(p.numel() for p in encoder.parameters() if p.requires_grad),
        largest_param=max(p.numel() for p in params),
        num_patches=encoder.num_patches, image_size=(height, width), patch_size=encoder.patch_size,
        encoder_rows=sum(p.numel() for p in encoder.parameters() if p.shape[0] == 1),
        predictor_rows=sum(p.numel() for p in predictor.parameters() if p.shape[0] == 1))


# ---------------------------------------------------------------- tokens from the mask config


@dataclass(frozen=True)
class Tokens:
    """Sequence lengths of one micro-step: context tokens per image, tokens per target block."""

    ctx: float
    tgt: float
    num_targets: int


class MaskTokens:
    """Context / target lengths the collator produces, from a few real draws of the config's masks.

    The collator cuts every context mask to the shortest one of its batch, so the context length
    depends on the micro-batch: it is the minimum over the micro-batch's images. One draw of
    `batch` images per step gives per-image context sizes; a micro-batch of b images is a chunk of
    b of them (statistically what the collator does for b images), so one draw serves every b.
    `worst(b)` (the longest over steps and chunks) sizes memory, `mean(b)` the FLOPs.
    """

    def __init__(self, ctx_per_image: torch.Tensor, tgt_per_step: torch.Tensor, num_targets: int) -> None:
        self.ctx = ctx_per_image  # [steps, batch] context tokens of each image (before the cut)
        self.tgt = tgt_per_step.float()  # [steps] tokens per target block (one size per batch)
        self.num_targets = num_targets

    @classmethod
    def from_collator(cls, collator: MultiBlockMaskCollator, batch: int, steps: int = MASK_SAMPLE_STEPS) -> MaskTokens:
        ctx, tgt = [], []
        for step in range(steps):
            blocks = collator.sample_block_masks(batch, step)
            ctx.append(blocks.enc.sum(-1).min(0).values)  # [B]; one context mask per image
            tgt.append(blocks.pred_size[0] * blocks.pred_size[1])
        return cls(torch.stack(ctx), torch.tensor(tgt), collator.npred)

    @classmethod
    def from_config(cls, cfg: Config, batch: int, steps: int = MASK_SAMPLE_STEPS) -> MaskTokens:
        # The collator exactly as train.build.build_collator makes it; built here so that planning
        # does not import the data pipeline (torchvision takes seconds to import).
        k = cfg.mask
        collator = MultiBlockMaskCollator(
            input_size=cfg.data.crop_size, patch_size=k.patch_size, enc_mask_scale=k.enc_mask_scale,
            pred_mask_scale=k.pred_mask_scale, aspect_ratio=k.aspect_ratio, nenc=k.num_enc_masks,
            npred=k.num_pred_masks, min_keep=k.min_keep, allow_overlap=k.allow_overlap,
            placement=k.placement, seed=cfg.meta.seed)
        return cls.from_collator(collator, min(max(1, batch), MASK_DRAW_BATCH), steps)

    def _chunk_minima(self, micro_batch: int) -> torch.Tensor:
        b = min(max(1, micro_batch), self.ctx.shape[1])  # beyond the draw: its full batch (conservative)
        chunks = self.ctx.shape[1] // b
        return self.ctx[:, : chunks * b].reshape(self.ctx.shape[0], chunks, b).min(-1).values.float()

    def worst(self, micro_batch: int) -> Tokens:
        return Tokens(float(self._chunk_minima(micro_batch).max()), float(self.tgt.max()), self.num_targets)

    def mean(self, micro_batch: int) -> Tokens:
        return Tokens(float(self._chunk_minima(micro_batch).mean()), float(self.tgt.mean()), self.num_targets)
