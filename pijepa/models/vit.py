"""I-JEPA's Vision Transformer encoder (no class token, fixed 2-D sin-cos positions).

Module and parameter names match the official checkpoints (``patch_embed.proj``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so their state dicts
load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast, get_args

import torch
import torch.nn as nn

from pijepa.masks.gather import apply_masks
from pijepa.models.attention import Attention
from pijepa.models.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed, to_grid
from pijepa.runtime.errors import ConfigError

LAYER_NORM_EPS = 1e-6

# name -> (embed_dim, depth, num_heads, mlp_ratio), as in I-JEPA's src/models/vision_transformer.py
ModelName = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
# reference: as I-JEPA's training script leaves its models; depth_scaled: plus the constructors'
# residual-branch rescaling (see rescale_residual_branches)
WeightInit = Literal["reference", "depth_scaled"]
WEIGHT_INITS: tuple[str, ...] = get_args(WeightInit)
VIT_SIZES: dict[str, tuple[int, int, int, float]] = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}

MaskArg = torch.Tensor | Sequence[torch.Tensor] | None


def mlp_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """``int(dim * ratio)`` as in the official code, robust to float error (1408 * 48/11 -> 6144)."""
    return int(math.floor(dim * mlp_ratio + 1e-6))


def as_mask_tensor(masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Normalise ``[M, B, K]`` / list of ``[B, K]`` / single ``[B, K]`` into an ``[M, B, K]`` tensor."""
    if not torch.is_tensor(masks):
        return torch.stack(list(masks), dim=0)
    if masks.dim() == 2:
        return masks.unsqueeze(0)
    if masks.dim() != 3:
        raise ValueError(f"masks must be [M, B, K] or [B, K], got shape {tuple(masks.shape)}")
    return masks


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> tokens via one strided convolution (``proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[B, C, H, W] -> ([B, h*w, D], (h, w))``; the grid is returned for position resizing."""
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; the unit wrapped by FSDP and activation checkpointing."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, attn_backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, mlp_hidden_dim(dim, mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer_weights(module: nn.Module, init_std: float) -> None:
    """I-JEPA's ``_init_weights``: truncated-normal Linear/Conv weights, zero biases, unit LayerNorm.

    As in the official code the truncation bounds are the absolute defaults (-2, 2), i.e. ~100
    std at std 0.02: in effect a plain normal.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def as_blocks(blocks: nn.ModuleList) -> list[Block]:
    """The ``Block``s of a ModuleList, typed as such (indexing a ModuleList gives a plain Module)."""
    return [cast(Block, block) for block in blocks]


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """I-JEPA's model-constructor ``fix_init_weight``: divide the weights writing into the residual
    stream of block ``i`` (1-based) by ``sqrt(2 i)``. Off by default (``depth_scaled_init``):
    I-JEPA's training script re-draws every Linear with trunc_normal(0.02) and zero bias after
    construction (``init_model`` in its helper.py), which undoes this rescaling, so the models it
    trains start without it; pijepa's default starts from the same distribution."""
    for layer_id, block in enumerate(as_blocks(blocks), start=1):
        rescale_residual_branch(block, layer_id)


def rescale_residual_branch(block: Block, layer_id: int) -> None:
    """`rescale_residual_branches` for the one block numbered ``layer_id`` (1-based)."""
    with torch.no_grad():
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class VisionTransformer(nn.Module):
    """I-JEPA context / target encoder.

    ``img_size`` (int or ``(H, W)``) fixes the size of the stored ``pos_embed``; other input sizes
    work too, with the embedding bicubically resized to the input's patch grid at every forward
    (nothing is cached, so the state dict never changes shape).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_backend: str = "sdpa",
        init_std: float = 0.02,
        depth_scaled_init: bool = False,
    ) -> None:
        super().__init__()
        self.depth_scaled_init = depth_scaled_init
        self.img_size = to_grid(img_size)
        self.patch_size = int(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.init_std = init_std

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim)
        # A Parameter (not a buffer) with requires_grad=False, as in the official code: it is then
        # in the state dict under the official name and counted in the parameter totals.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, attn_backend=attn_backend) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.init_weights()

    @property
    def attn_backend(self) -> str:
        return as_blocks(self.blocks)[0].attn.attn_backend if len(self.blocks) else "sdpa"

    def init_weights(self) -> None:
        """(Re)initialise everything, e.g. after ``to_empty()`` on a model built on ``meta``."""
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.embed_dim, self.grid_size).unsqueeze(0))
        init_transformer_weights(self, self.init_std)
        if self.depth_scaled_init:
            rescale_residual_branches(self.blocks)

    def forward(self, x: torch.Tensor, masks: MaskArg = None) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, N, D]``, or ``[M*B, K, D]`` with ``masks`` ``[M, B, K]`` (mask-major).

        Positions are added before masking, so each kept token keeps its place on the grid.
        """
        x, grid = self.patch_embed(x)
        x = x + interpolate_pos_embed(self.pos_embed, self.grid_size, grid)
        if masks is not None:
            x = apply_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _vit(name: str, **kwargs: Any) -> VisionTransformer:
    embed_dim, depth, num_heads, mlp_ratio = VIT_SIZES[name]
    config: dict[str, Any] = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    config.update(kwargs)
    return VisionTransformer(**config)


def vit_tiny(**kwargs: Any) -> VisionTransformer:
    return _vit("vit_tiny", **kwargs)


def vit_small(**kwargs: Any) -> VisionTransformer:
    return _vit("vit_small", **kwargs)


def vit_base(**kwargs: Any) -> VisionTransformer:
    return _vit("vit_base", **kwargs)


def vit_large(**kwargs: Any) -> VisionTransformer:
    return _vit("vit_large", **kwargs)


def vit_huge(**kwargs: Any) -> VisionTransformer:
    return _vit("vit_huge", **kwargs)


def vit_giant(**kwargs: Any) -> VisionTransformer:
    return _vit("vit_giant", **kwargs)


def canonical_model_name(model_name: str) -> str:
    """Accept ``"vit_huge"`` (the official config spelling) as well as ``"huge"``."""
    name = model_name if model_name.startswith("vit_") else f"vit_{model_name}"
    if name not in VIT_SIZES:
        raise ConfigError(f"unknown model_name {model_name!r}; expected one of {sorted(VIT_SIZES)}")
    return name


def build_encoder(
    model_name: str,
    patch_size: int = 16,
    img_size: int | tuple[int, int] = 224,
    attn_backend: str = "sdpa",
    depth: int = 0,
    depth_scaled_init: bool = False,
) -> VisionTransformer:
    """Encoder of a standard size (``depth`` > 0 overrides its number of blocks); build under
    ``torch.device("meta")`` to skip allocation."""
    kwargs: dict[str, Any] = dict(patch_size=patch_size, img_size=img_size, attn_backend=attn_backend,
                                  depth_scaled_init=depth_scaled_init)
    if depth:
        kwargs["depth"] = depth
    return _vit(canonical_model_name(model_name), **kwargs)
