"""`pijepa export --format timm | hf`: one encoder of a consolidated checkpoint (parallel/formats.py)
written where timm and Hugging Face transformers load it (the name and config mappings are
pijepa.models.interop). Every export records which encoder it holds (`target`, the EMA encoder
I-JEPA evaluates, or `context`), the step and the pijepa config of the run it came from.

- timm: `OUT` (safetensors, timm's names: pijepa's) and `OUT.json`: {"architecture", "model_args"}
  for `timm.create_model(architecture, **model_args)` + `load_state_dict(strict=True)`, and where
  it came from (also in the safetensors metadata).
- hf: folder `OUT/` with `config.json`, `model.safetensors` (IJepaModel names, qkv split) and
  `preprocessor_config.json` (ImageNet statistics): `IJepaModel.from_pretrained(OUT)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from pijepa.models.interop import hf_config, hf_preprocessor, hf_state_dict, timm_architecture, timm_model_args
from pijepa.models.loading import ENCODER_ENTRIES, config_from_model_entry, infer_encoder_config
from pijepa.runtime.atomic import atomic_write_bytes, atomic_write_json

ExportFormat = Literal["pijepa", "timm", "hf"]
Which = Literal["target", "context"]


def encoder_config(result: dict[str, Any], which: str, source: str) -> dict[str, Any]:
    """The encoder's VisionTransformer arguments: its `model` entry, else read off the weights."""
    state = result[ENCODER_ENTRIES[which]]
    model = result.get("model")
    config = config_from_model_entry(model, source) if model else infer_encoder_config(state, source)
    return {**infer_encoder_config(state, source), **config}  # the shapes fill what the entry leaves out


def origin(result: dict[str, Any], which: str, checkpoint: str, fmt: str) -> dict[str, Any]:
    return {"format": f"pijepa-{fmt}-v1", "which": which, "step": result["step"], "checkpoint": checkpoint,
            "model": result.get("model"), "pijepa_config": result.get("config")}


def _safetensors_bytes(tensors: dict[str, torch.Tensor], about: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    metadata = {key: json.dumps(value) for key, value in about.items()}  # safetensors keeps strings only
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def write_timm(out: Path, result: dict[str, Any], which: str, checkpoint: str) -> None:
    config = encoder_config(result, which, checkpoint)
    about = origin(result, which, checkpoint, "timm")
    atomic_write_bytes(out, _safetensors_bytes(result[ENCODER_ENTRIES[which]], about))
    atomic_write_json(out.with_name(out.name + ".json"),
                      {"architecture": timm_architecture(config), "model_args": timm_model_args(config), **about})


def write_hf(out: Path, result: dict[str, Any], which: str, checkpoint: str) -> None:
    config = encoder_config(result, which, checkpoint)
    about = origin(result, which, checkpoint, "hf")
    tensors = hf_state_dict(result[ENCODER_ENTRIES[which]], config["depth"])
    atomic_write_bytes(out / "model.safetensors", _safetensors_bytes(tensors, {"format": "pt", **about}))
    atomic_write_json(out / "preprocessor_config.json", hf_preprocessor(config["img_size"]))
    atomic_write_json(out / "config.json", {**hf_config(config), "pijepa": about})  # last: the folder is complete
