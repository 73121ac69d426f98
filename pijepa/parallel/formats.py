"""`pijepa export`: one checkpoint of a run -> one self-contained encoder file.

Each strategy saves in its own form (one `state.pt`, a DCP folder written by N ranks, ...), so each
strategy module exposes

    read_full_state(folder) -> {"encoder": sd, "predictor": sd, "target_encoder": sd, "extra": dict}

which reads a checkpoint folder in this one process, whatever the world size it was written at.
The folder's format is recognised by the files in it (FORMATS, first match wins). The output

    {"format": "pijepa-encoder-v1", "model": {model_name, patch_size, img_size, ...}, "step": N,
     "encoder": sd, "target_encoder": sd, "predictor": sd}

holds plain contiguous fp32 tensors under canonical names (no wrapper prefixes) and loads with
`pijepa.load_encoder(path, which="target" | "context")`.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pijepa.parallel.parallelize import canonical_name

ENCODER_FORMAT = "pijepa-encoder-v1"
PARTS = ("encoder", "target_encoder", "predictor")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    marker: str  # glob pattern, relative to the checkpoint folder, that only this format writes
    reader: str  # module exposing read_full_state(folder)


FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat("single", "state.pt", "pijepa.parallel.single"),  # single process and DDP
    CheckpointFormat("fsdp", ".metadata", "pijepa.parallel.fsdp"),  # torch.distributed.checkpoint
    CheckpointFormat("deepspeed", "ds_state.pt", "pijepa.parallel.deepspeed"),  # engine.save_checkpoint + ds_state.pt
)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step folders of a run, oldest first (`.tmp` folders are unfinished saves)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ folder; is this a pijepa run folder?")
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The folder of `step`, else the one `latest` names, else the newest."""
    found = list_checkpoints(run_dir)
    steps = ", ".join(str(int(p.name[5:])) for p in found) or "none"
    if step is not None:
        for p in found:
            if int(p.name[5:]) == step:
                return p
        raise FileNotFoundError(f"{run_dir}: no checkpoint of step {step} (steps found: {steps})")
    if not found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint in checkpoints/")
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.is_file():
        named = latest.parent / latest.read_text().strip()
        if named in found:
            return named
    return found[-1]


def detect_format(folder: Path) -> CheckpointFormat:
    for fmt in FORMATS:
        if any(Path(folder).glob(fmt.marker)):
            return fmt
    files = sorted(p.name for p in Path(folder).iterdir())[:10]
    known = ", ".join(f"{f.name} ({f.marker})" for f in FORMATS)
    raise ValueError(f"{folder}: unknown checkpoint format (files: {files}); known formats: {known}")


def read_full_state(folder: Path) -> tuple[CheckpointFormat, dict[str, Any]]:
    fmt = detect_format(folder)
    state = importlib.import_module(fmt.reader).read_full_state(Path(folder))
    missing = [p for p in (*PARTS, "extra") if p not in state]
    if missing:
        raise ValueError(f"{folder}: the {fmt.name} checkpoint lacks {missing}")
    return fmt, state


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names; fp32 (floating tensors), contiguous CPU tensors owning their storage."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        out[canonical_name(name.removeprefix("module."))] = tensor.contiguous().clone()
    return out


def export_encoder(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Consolidates one checkpoint of `run_dir` into `out`; returns a short summary."""
    folder = find_checkpoint(Path(run_dir), step)
    fmt, state = read_full_state(folder)
    extra = state["extra"]
    result: dict[str, Any] = {"format": ENCODER_FORMAT}
    if isinstance(extra.get("model"), dict):
        result["model"] = dict(extra["model"])
    result["step"] = int(extra.get("step", int(folder.name[5:])))
    for part in PARTS:
        result[part] = plain_state_dict(state[part])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(result, tmp)
    tmp.replace(out)  # never leaves a half-written file under the final name
    return {"checkpoint": str(folder), "source_format": fmt.name, "step": result["step"],
            **{part: len(result[part]) for part in PARTS}}
