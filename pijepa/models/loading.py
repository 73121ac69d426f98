"""Loading a pretrained encoder from an official I-JEPA checkpoint or one of ours.

Accepted: a transformers IJepaModel folder (``config.json`` + ``model.safetensors``: ours, or the
published I-JEPA models from the hub), a timm ``.safetensors`` file (timm's names are pijepa's),
and these files (``torch.load(..., weights_only=True)``), both dicts holding state dicts:

- official I-JEPA ``.pth.tar``: ``encoder``, ``predictor``, ``target_encoder``, ``opt``, ``epoch``, ...
  with every parameter name prefixed ``module.`` (the models were DDP-wrapped when saved);
- pijepa checkpoints: ``encoder``, ``target_encoder`` (optionally ``predictor``) without prefix,
  optionally a ``model`` dict ``{model_name, patch_size, img_size}`` describing the encoder, at the
  top level or inside ``extra`` (as the trainer's ``state.pt`` stores it).

Without a ``model`` dict the architecture is read off the weights; only the head count is not
visible in the shapes, so it is taken from the standard I-JEPA size of that width.

A path that holds no such file, or a file that does not describe a loadable encoder, raises a
CheckpointError naming the path (one line from the CLI).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from pijepa.models.attention import resolve_attn_backend
from pijepa.models.interop import config_from_hf, from_hf_state_dict
from pijepa.models.vit import VIT_SIZES, VisionTransformer, canonical_model_name
from pijepa.runtime.errors import CheckpointError, CheckpointNotFoundError, ConfigError

ENCODER_ENTRIES = {"target": "target_encoder", "context": "encoder"}

# Wrappers that prefix parameter names: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Standard width -> head count (head dim 64, except the 16-head large/huge/giant).
HEADS_BY_WIDTH = {embed_dim: heads for embed_dim, _, heads, _ in VIT_SIZES.values()}


def _strip_wrapper_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def describe_load_error(error: Exception) -> str:
    """One line for a failed ``torch.load``; a refusal by weights_only loading says so plainly."""
    if "Weights only load failed" in str(error):
        return "refused: its pickle would run code (checkpoints load with weights_only=True)"
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def read_checkpoint(path: str) -> dict[str, Any]:
    """``torch.load`` on the CPU with ``weights_only=True``, turning failures into a clear CheckpointError."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it (e.g. its state.pt)")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, zip and format errors all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint loadable with weights_only=True "
                              f"({describe_load_error(error)})") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, expected a dict with 'encoder' and "
            f"'target_encoder' state dicts (an I-JEPA or pijepa checkpoint)"
        )
    return dict(checkpoint)


def encoder_state_dict(checkpoint: Mapping[str, Any], which: str, path: str) -> dict[str, torch.Tensor]:
    """The un-prefixed state dict of the ``which`` ("target" / "context") encoder."""
    if which not in ENCODER_ENTRIES:
        raise ConfigError(f"which must be one of {sorted(ENCODER_ENTRIES)}, got {which!r}")
    entry = ENCODER_ENTRIES[which]
    if entry not in checkpoint:
        raise CheckpointError(
            f"{path} has no {entry!r} entry (needed for which={which!r}); "
            f"it contains {sorted(map(str, checkpoint))}"
        )
    state = checkpoint[entry]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: entry {entry!r} is not a state dict of tensors")
    return {_strip_wrapper_prefixes(name): tensor for name, tensor in state.items()}


def _require(state: Mapping[str, torch.Tensor], name: str, path: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{path}: encoder weights lack {name!r}; this is not an I-JEPA ViT encoder")
    return state[name]


def infer_encoder_config(state: Mapping[str, torch.Tensor], path: str = "<state dict>") -> dict[str, Any]:
    """``VisionTransformer`` keyword arguments read off the weights' shapes."""
    patch_weight = _require(state, "patch_embed.proj.weight", path)  # [D, C, p, p]
    embed_dim, in_chans, patch_h, patch_w = patch_weight.shape
    if patch_h != patch_w:
        raise CheckpointError(f"{path}: non-square patches {patch_h}x{patch_w} are not supported")
    block_ids = {int(name.split(".")[1]) for name in state if name.startswith("blocks.")}
    if not block_ids:
        raise CheckpointError(f"{path}: encoder weights have no 'blocks.*' entries")
    hidden_dim = _require(state, "blocks.0.mlp.fc1.weight", path).shape[0]
    num_patches = _require(state, "pos_embed", path).shape[1]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(
            f"{path}: pos_embed has {num_patches} positions, not a square grid; save a 'model' "
            f"dict with img_size to load it"
        )
    if embed_dim not in HEADS_BY_WIDTH:
        raise CheckpointError(
            f"{path}: width {embed_dim} is not a standard I-JEPA size {sorted(HEADS_BY_WIDTH)}, so the "
            f"head count is unknown; save a 'model' dict with num_heads to load it"
        )
    return dict(
        img_size=side * patch_h,
        patch_size=patch_h,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=max(block_ids) + 1,
        num_heads=HEADS_BY_WIDTH[embed_dim],
        mlp_ratio=hidden_dim / embed_dim,
    )


def config_from_model_entry(model: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``VisionTransformer`` keyword arguments from a pijepa ``model`` dict."""
    if "model_name" not in model:
        raise CheckpointError(f"{path}: the 'model' entry has no 'model_name' (keys: {sorted(model)})")
    try:
        name = canonical_model_name(str(model["model_name"]))
    except ValueError as error:  # an unknown size name (a ConfigError where it is a config value)
        raise CheckpointError(f"{path}: {error}") from error
    embed_dim, depth, num_heads, mlp_ratio = VIT_SIZES[name]
    config: dict[str, Any] = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    for key in ("patch_size", "img_size", "num_heads", "depth"):
        if key in model:
            config[key] = model[key]
    return config


def find_model_entry(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``model`` description, at the top level or inside ``extra`` (where the trainer puts it)."""
    for holder in (checkpoint, checkpoint.get("extra")):
        if isinstance(holder, Mapping) and isinstance(holder.get("model"), Mapping):
            return holder["model"]
    return None


def _natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort ``blocks.2`` before ``blocks.10`` so error messages list the first offenders."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _check_shapes(encoder: VisionTransformer, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Name every missing, unexpected and mis-shaped entry (load_state_dict's error is less clear)."""
    expected = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    missing = sorted(set(expected) - set(state), key=_natural_key)
    unexpected = sorted(set(state) - set(expected), key=_natural_key)
    mismatched = [
        f"{name}: file {tuple(state[name].shape)} vs model {shape}"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            problems.append(f"{label} ({len(names)}): {names[:5]}{' ...' if len(names) > 5 else ''}")
    if problems:
        raise CheckpointError(
            f"{path}: encoder weights do not fit a ViT(embed_dim={encoder.embed_dim}, depth={encoder.depth}, "
            f"patch_size={encoder.patch_size}, img_size={encoder.img_size}): " + "; ".join(problems)
        )


def read_encoder_weights(path: str, which: str = "target") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(pijepa-named encoder state dict, VisionTransformer arguments) of any file an encoder comes
    in: an official I-JEPA `.pth.tar`, a pijepa checkpoint or export, a Hugging Face folder
    (`pijepa export --format hf`, or an I-JEPA model from the hub) or a timm safetensors file. A
    one-encoder file holds what it holds: `which` applies to the files that hold both."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return _read_hf(path)
    if path.endswith(".safetensors"):
        return _read_timm(path)
    checkpoint = read_checkpoint(path)
    state = encoder_state_dict(checkpoint, which, path)
    model_entry = find_model_entry(checkpoint)
    if model_entry is not None:
        return state, config_from_model_entry(model_entry, path)
    return state, infer_encoder_config(state, path)


def _safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"encoder file not found: {path}")
    try:
        return load_file(path)
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({describe_load_error(error)})") from None


def _read_hf(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config_file = os.path.join(folder, "config.json")
    config = json.loads(open(config_file).read())
    if config.get("model_type") != "ijepa":
        raise CheckpointError(f"{config_file}: model_type {config.get('model_type')!r}, expected 'ijepa' "
                              f"(a transformers IJepaModel folder)")
    tensors = _safetensors(os.path.join(folder, "model.safetensors"))
    tensors = {name.removeprefix("ijepa."): t for name, t in tensors.items()}  # a classification model's backbone
    try:
        return from_hf_state_dict(tensors), config_from_hf(config)
    except KeyError as missing:
        raise CheckpointError(f"{folder}: model.safetensors lacks {missing}; not an IJepaModel's weights") from None


def _read_timm(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = _safetensors(path)
    config = infer_encoder_config(state, path)
    sidecar = path + ".json"  # pijepa's timm export: its heads and sizes, when the shapes do not tell
    if os.path.isfile(sidecar):
        args = json.loads(open(sidecar).read()).get("model_args", {})
        config.update({k: args[k] for k in ("img_size", "num_heads", "depth", "mlp_ratio") if k in args})
    return state, config


def load_encoder(
    path: str | os.PathLike,
    which: str = "target",
    device: str | torch.device = "cpu",
    attn_backend: str = "sdpa",
) -> VisionTransformer:
    """Build the encoder stored in ``path`` and load its weights (strict), in eval mode on ``device``.

    ``which="target"`` takes the EMA target encoder (the one I-JEPA evaluates), ``"context"`` the
    context encoder. The model is built on the meta device and the loaded tensors are assigned to
    it, so a ViT-g costs one copy of its weights, not two, and no random initialisation.
    """
    path = os.fspath(path)
    state, config = read_encoder_weights(path, which)
    attn_backend = resolve_attn_backend(attn_backend)  # an unknown name is the caller's error, not the file's
    try:
        with torch.device("meta"):
            encoder = VisionTransformer(attn_backend=attn_backend, **config)
    except (TypeError, ValueError) as error:  # e.g. a 'model' entry whose sizes do not fit together
        raise CheckpointError(f"{path}: cannot build the encoder it describes ({config}): {error}") from error
    _check_shapes(encoder, state, path)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.to(device).eval()
