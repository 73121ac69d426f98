"""An encoder's weights in the layouts timm and Hugging Face transformers load.

pijepa's encoder is I-JEPA's ViT: no class token, patch tokens after a final LayerNorm (eps 1e-6),
exact GELU, biased qkv. Its parameter names are timm's already; timm builds the same network as
`VisionTransformer(class_token=False, global_pool="avg", fc_norm=False, num_classes=0)` (the
`*_gap_*` I-JEPA models), so a timm export is the same tensors with the model's keyword arguments
beside them. transformers' `IJepaModel` (5.x) names them `embeddings.*`, `layers.N.*`,
`layernorm.*` and splits qkv into q_proj / k_proj / v_proj by rows.

At another resolution pijepa resizes the positional table by bicubic interpolation to the exact
grid; transformers does the same (`interpolate_pos_encoding=True`), and so does timm when a model
is made at the new `img_size` and the file is loaded through `checkpoint_filter_fn` with
`antialias=False` (`timm.models.load_checkpoint(model, path, filter_fn=partial(checkpoint_filter_fn,
antialias=False))`). timm's default (and its `dynamic_img_size`) resizes with antialiasing, another
kernel when enlarging: its tokens then differ (by up to 0.06 at 48 px from 32 in the test model).
tests/e2e/test_interop.py holds both libraries to pijepa's tokens at two resolutions.
"""

from __future__ import annotations

from typing import Any

import torch

from pijepa.models.vit import LAYER_NORM_EPS

# The timm architecture whose defaults come nearest, by width (every size is overridden anyway).
TIMM_BASE = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
             1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_gap_224", 1408: "vit_giant_patch16_gap_224"}
# I-JEPA normalises inputs with ImageNet's statistics (transformers' ViT processor defaults to 0.5).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timm_model_args(config: dict[str, Any]) -> dict[str, Any]:
    """`timm.create_model(architecture, **args)` keyword arguments for an encoder of `config`
    (pijepa's VisionTransformer arguments: embed_dim, depth, num_heads, mlp_ratio, patch_size,
    img_size)."""
    return {"img_size": config["img_size"], "patch_size": config["patch_size"], "embed_dim": config["embed_dim"],
            "depth": config["depth"], "num_heads": config["num_heads"], "mlp_ratio": config["mlp_ratio"],
            "qkv_bias": True, "class_token": False, "global_pool": "avg", "fc_norm": False, "num_classes": 0}


def timm_architecture(config: dict[str, Any]) -> str:
    return TIMM_BASE.get(config["embed_dim"], "vit_base_patch16_224")


def hf_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """pijepa encoder names -> transformers' IJepaModel names (qkv split into q, k, v by rows)."""
    out = {"embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{dst}attention.{name}.{kind}"] = part.contiguous()
            out[f"{dst}attention.o_proj.{kind}"] = state[f"{src}attn.proj.{kind}"]
            out[f"{dst}layernorm_before.{kind}"] = state[f"{src}norm1.{kind}"]
            out[f"{dst}layernorm_after.{kind}"] = state[f"{src}norm2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config.json` of an IJepaModel for an encoder of `config`."""
    width = config["embed_dim"]
    return {"model_type": "ijepa", "architectures": ["IJepaModel"], "hidden_size": width,
            "num_hidden_layers": config["depth"], "num_attention_heads": config["num_heads"],
            "intermediate_size": round(width * config["mlp_ratio"]), "hidden_act": "gelu",
            "layer_norm_eps": LAYER_NORM_EPS, "qkv_bias": True, "image_size": config["img_size"],
            "patch_size": config["patch_size"], "num_channels": config.get("in_chans", 3),
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def hf_preprocessor(img_size: int) -> dict[str, Any]:
    """`preprocessor_config.json`: resize to the training crop, ImageNet statistics."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": img_size, "width": img_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


def from_hf_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' IJepaModel names -> pijepa's (q, k, v joined into qkv); the inverse of
    `hf_state_dict`."""
    depth = len({name.split(".")[1] for name in tensors if name.startswith("layers.")})
    out = {"pos_embed": tensors["embeddings.position_embeddings"],
           "patch_embed.proj.weight": tensors["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": tensors["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": tensors["layernorm.weight"], "norm.bias": tensors["layernorm.bias"]}
    for i in range(depth):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [tensors[f"{src}attention.{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")])
            out[f"{dst}attn.proj.{kind}"] = tensors[f"{src}attention.o_proj.{kind}"]
            out[f"{dst}norm1.{kind}"] = tensors[f"{src}layernorm_before.{kind}"]
            out[f"{dst}norm2.{kind}"] = tensors[f"{src}layernorm_after.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = tensors[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = tensors[f"{src}mlp.fc2.{kind}"]
    return out


def config_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """pijepa VisionTransformer arguments of an IJepaModel `config.json`."""
    width = config["hidden_size"]
    return {"embed_dim": width, "depth": config["num_hidden_layers"], "num_heads": config["num_attention_heads"],
            "mlp_ratio": config["intermediate_size"] / width, "patch_size": config["patch_size"],
            "img_size": config["image_size"], "in_chans": config.get("num_channels", 3)}
