"""I-JEPA encoder and predictor, attention backends, positional embeddings, checkpoint loading."""

# The function pijepa.models.attention.attention is deliberately not re-exported: the name would
# shadow the submodule pijepa.models.attention.
from pijepa.models.attention import ATTN_BACKENDS, Attention, resolve_attn_backend, set_attn_backend
from pijepa.models.loading import infer_encoder_config, load_encoder
from pijepa.models.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from pijepa.models.predictor import VisionTransformerPredictor, build_predictor
from pijepa.models.vit import (
    VIT_SIZES,
    Block,
    VisionTransformer,
    build_encoder,
    vit_base,
    vit_giant,
    vit_huge,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ATTN_BACKENDS",
    "Attention",
    "Block",
    "VIT_SIZES",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "build_encoder",
    "build_predictor",
    "get_2d_sincos_pos_embed",
    "infer_encoder_config",
    "interpolate_pos_embed",
    "load_encoder",
    "resolve_attn_backend",
    "set_attn_backend",
    "vit_base",
    "vit_giant",
    "vit_huge",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
