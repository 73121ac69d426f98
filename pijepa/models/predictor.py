"""I-JEPA's narrow ViT predictor: context tokens + positional mask tokens -> target representations.

Parameter names match the official checkpoints (``predictor_embed``, ``mask_token``,
``predictor_pos_embed``, ``predictor_blocks.{i}...``, ``predictor_norm``, ``predictor_proj``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from pijepa.models.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed, to_grid
from pijepa.models.vit import (
    LAYER_NORM_EPS,
    Block,
    VisionTransformer,
    as_blocks,
    as_mask_tensor,
    init_transformer_weights,
    rescale_residual_branches,
)


def _grid_from_num_patches(num_patches: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """The official constructor takes ``num_patches`` (a square grid); we also accept ``(h, w)``."""
    if isinstance(num_patches, int):
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise ValueError(f"num_patches={num_patches} is not a square grid; pass the grid as (h, w)")
        return (side, side)
    return to_grid(num_patches)


def gather_positions(pos_embed: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``pos_embed [1, N, D]`` at ``masks [M, B, K]`` -> ``[M*B, K, D]`` (mask-major).

    Equal to ``apply_masks(pos_embed.repeat(B, 1, 1), masks)`` as in the official code, but indexes
    the single shared table directly instead of materialising B copies of it first.
    """
    num_masks, batch, keep = masks.shape
    return pos_embed[0][masks].reshape(num_masks * batch, keep, pos_embed.shape[-1])


class VisionTransformerPredictor(nn.Module):
    def __init__(
        self,
        num_patches: int | tuple[int, int],
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_backend: str = "sdpa",
        init_std: float = 0.02,
        depth_scaled_init: bool = False,
    ) -> None:
        super().__init__()
        self.depth_scaled_init = depth_scaled_init
        self.grid_size = _grid_from_num_patches(num_patches)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.predictor_embed_dim = predictor_embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.init_std = init_std

        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        # One learned token shared by every target position; the positional embedding tells it where.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches, predictor_embed_dim), requires_grad=False
        )
        self.predictor_blocks = nn.ModuleList(
            [Block(predictor_embed_dim, num_heads, mlp_ratio, attn_backend=attn_backend) for _ in range(depth)]
        )
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        self.init_weights()

    @property
    def attn_backend(self) -> str:
        return as_blocks(self.predictor_blocks)[0].attn.attn_backend if len(self.predictor_blocks) else "sdpa"

    def init_weights(self) -> None:
        """(Re)initialise everything, e.g. after ``to_empty()`` on a model built on ``meta``."""
        with torch.no_grad():
            pos = get_2d_sincos_pos_embed(self.predictor_embed_dim, self.grid_size)
            self.predictor_pos_embed.copy_(pos.unsqueeze(0))
        nn.init.trunc_normal_(self.mask_token, std=self.init_std)
        init_transformer_weights(self, self.init_std)
        if self.depth_scaled_init:  # off by default: see vit.rescale_residual_branches
            rescale_residual_branches(self.predictor_blocks)

    def forward(
        self,
        ctx: torch.Tensor,
        masks_enc: torch.Tensor | Sequence[torch.Tensor],
        masks_pred: torch.Tensor | Sequence[torch.Tensor],
        grid_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``ctx [B, Kc, D]``, ``masks_enc [1, B, Kc]``, ``masks_pred [M, B, K]`` -> ``[M*B, K, D]``.

        Each target block is predicted in its own sequence ``[context, K mask tokens]``; rows are
        mask-major like ``apply_masks``. ``grid_size`` is the patch grid the mask indices refer to
        when it differs from the one the predictor was built for (the predictor never sees the
        image, so it cannot infer a non-square grid); its positions are then resized like the
        encoder's. More than one context mask (``[Me, B, Kc]`` with ``ctx [Me*B, Kc, D]``) follows
        the official ordering: output rows ``(target mask, context mask, image)``.
        """
        masks_enc = as_mask_tensor(masks_enc)
        masks_pred = as_mask_tensor(masks_pred)
        num_enc, batch, num_ctx = masks_enc.shape
        num_pred, _, num_tgt = masks_pred.shape
        if ctx.dim() != 3 or ctx.shape[0] != num_enc * batch or ctx.shape[1] != num_ctx:
            raise ValueError(
                f"ctx {tuple(ctx.shape)} does not match masks_enc {tuple(masks_enc.shape)} "
                f"(expected [{num_enc}*{batch}, {num_ctx}, D])"
            )
        if masks_pred.shape[1] != batch:
            raise ValueError(f"masks_pred {tuple(masks_pred.shape)} and masks_enc disagree on the batch size")

        grid = self.grid_size if grid_size is None else to_grid(grid_size)
        pos = interpolate_pos_embed(self.predictor_pos_embed, self.grid_size, grid)

        x = self.predictor_embed(ctx) + gather_positions(pos, masks_enc)

        # Mask tokens at the target positions, [Mp*B, K, Dp]; with several context masks, each
        # target block is repeated once per context (official repeat_interleave_batch order).
        target_pos = gather_positions(pos, masks_pred)
        if num_enc > 1:
            target_pos = target_pos.view(num_pred, 1, batch, num_tgt, -1).expand(-1, num_enc, -1, -1, -1)
            target_pos = target_pos.reshape(num_pred * num_enc * batch, num_tgt, -1)
        targets = self.mask_token + target_pos

        x = torch.cat([x.repeat(num_pred, 1, 1), targets], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        # Norm is per token, so dropping the context first gives the official result for less work.
        x = self.predictor_norm(x[:, num_ctx:])
        return self.predictor_proj(x)


def build_predictor(
    encoder: VisionTransformer,
    pred_depth: int = 12,
    pred_emb_dim: int = 384,
    attn_backend: str | None = None,
    depth_scaled_init: bool | None = None,
) -> VisionTransformerPredictor:
    """Predictor for ``encoder``: same grid and head count (as the official ``vit_predictor`` call),
    same attention backend and init rule unless told otherwise."""
    return VisionTransformerPredictor(
        encoder.grid_size,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=pred_emb_dim,
        depth=pred_depth,
        num_heads=encoder.num_heads,
        attn_backend=encoder.attn_backend if attn_backend is None else attn_backend,
        depth_scaled_init=encoder.depth_scaled_init if depth_scaled_init is None else depth_scaled_init,
    )
