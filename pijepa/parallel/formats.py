"""A run folder's checkpoints in any strategy's format: their names and listing (also used by
the trainer's Checkpointer), and `pijepa export`: one checkpoint -> one self-contained encoder file.

Each strategy saves in its own form (one `state.pt`, a DCP folder written by N ranks, ...), so each
strategy module exposes

    read_full_state(folder) -> {"encoder": sd, "predictor": sd, "target_encoder": sd, "extra": dict}

(the DeepSpeed one is in deepspeed_checkpoint.py), which reads a checkpoint folder in this one
process, whatever the world size it was written at. The folder's format is recognised by the
files in it (FORMATS, first match wins). The output

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

from pijepa.models.loading import describe_load_error
from pijepa.parallel.parallelize import canonical_name
from pijepa.runtime.atomic import atomic_torch_save
from pijepa.runtime.errors import CheckpointError, CheckpointNotFoundError

ENCODER_FORMAT = "pijepa-encoder-v1"
PARTS = ("encoder", "target_encoder", "predictor")

# A run folder's checkpoints: `checkpoints/step_XXXXXXXX/` (complete), `step_XXXXXXXX.tmp/` (a save
# in progress or interrupted), `latest` (names the newest complete one). The one place for the names.
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_UNFINISHED_STEP_DIR = re.compile(r"^step_(\d{8})\.tmp$")


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    marker: str  # glob pattern, relative to the checkpoint folder, that only this format writes
    reader: str  # module exposing read_full_state(folder)
    written_by: str  # the strategies that write it, for messages


FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat("single", "state.pt", "pijepa.parallel.single",  # single process and DDP
                     "dist.strategy single or ddp"),
    CheckpointFormat("fsdp", ".metadata", "pijepa.parallel.fsdp",  # torch.distributed.checkpoint
                     "dist.strategy fsdp"),
    CheckpointFormat("deepspeed", "ds_state.pt", "pijepa.parallel.deepspeed_checkpoint",  # engine + ds_state.pt
                     "dist.strategy deepspeed"),
)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def unfinished_dir(final: Path) -> Path:
    """Where the checkpoint that will be `final` is written before its rename."""
    return final.with_name(final.name + ".tmp")


def finished_dir(unfinished: Path) -> Path:
    """The final name of a `step_XXXXXXXX.tmp` folder (the inverse of unfinished_dir)."""
    if not _UNFINISHED_STEP_DIR.match(Path(unfinished).name):
        raise ValueError(f"{unfinished}: not an unfinished step folder")  # a bug: callers list .tmp folders
    return Path(unfinished).with_name(Path(unfinished).name.removesuffix(".tmp"))


def step_of(folder: Path) -> int:
    """The step of a checkpoint folder `step_XXXXXXXX`."""
    match = _STEP_DIR.match(Path(folder).name)
    if match is None:
        raise ValueError(f"{folder}: not a step folder (step_XXXXXXXX)")  # a bug: callers list step folders
    return int(match.group(1))


def step_folders(root: Path) -> list[Path]:
    """Complete step folders under a `checkpoints/` folder, oldest first; [] if there is none
    (`.tmp` folders are unfinished saves, `.unreadable*` ones were set aside on resume)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def unfinished_step_folders(root: Path) -> list[Path]:
    """`step_XXXXXXXX.tmp` folders under a `checkpoints/` folder: saves that never completed."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _UNFINISHED_STEP_DIR.match(p.name))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step folders of a run, oldest first (`.tmp` folders are unfinished saves)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{run_dir}: no {CHECKPOINTS_DIR}/ folder; is this a pijepa run folder?")
    return step_folders(root)


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The folder of `step`, else the one `latest` names, else the newest."""
    found = list_checkpoints(run_dir)
    steps = ", ".join(str(step_of(p)) for p in found) or "none"
    if step is not None:
        for p in found:
            if step_of(p) == step:
                return p
        raise CheckpointNotFoundError(f"{run_dir}: no checkpoint of step {step} (steps found: {steps})")
    if not found:
        raise CheckpointNotFoundError(f"{run_dir}: no complete checkpoint in {CHECKPOINTS_DIR}/")
    latest = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if latest.is_file():
        named = latest.parent / latest.read_text().strip()
        if named in found:
            return named
    return found[-1]


def _format_of(folder: Path) -> CheckpointFormat | None:
    return next((fmt for fmt in FORMATS if any(Path(folder).glob(fmt.marker))), None)


def detect_format(folder: Path) -> CheckpointFormat:
    fmt = _format_of(folder)
    if fmt is not None:
        return fmt
    files = sorted(p.name for p in Path(folder).iterdir())[:10]
    known = ", ".join(f"{f.name} ({f.marker})" for f in FORMATS)
    raise CheckpointError(f"{folder}: unknown checkpoint format (files: {files}); known formats: {known}")


def written_by(folder: Path) -> str:
    """" (it holds state.pt: written by dist.strategy single or ddp)" for a folder in a known
    format, else "": the hint in a strategy's "not a checkpoint of mine" message."""
    fmt = _format_of(folder)
    return f" (it holds {fmt.marker}: written by {fmt.written_by})" if fmt is not None else ""


def read_full_state(folder: Path) -> tuple[CheckpointFormat, dict[str, Any]]:
    fmt = detect_format(folder)
    try:
        state = importlib.import_module(fmt.reader).read_full_state(Path(folder))
    except ValueError:  # a CheckpointError (one line), or a bug in the reader (a traceback)
        raise
    except Exception as e:  # a truncated or damaged file: the reader's error, in one line
        raise CheckpointError(f"{folder}: not a readable {fmt.name} checkpoint ({describe_load_error(e)})") from None
    missing = [p for p in (*PARTS, "extra") if p not in state]
    if missing:
        raise CheckpointError(f"{folder}: the {fmt.name} checkpoint lacks {missing}")
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


def export_encoder(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
                   fmt: str = "pijepa", which: str = "target") -> dict[str, Any]:
    """Consolidates one checkpoint of `run_dir` into `out` (pijepa's file, or one encoder for timm or
    transformers: parallel/exports.py); returns a short summary."""
    from pijepa.parallel.exports import write_hf, write_timm

    folder = find_checkpoint(Path(run_dir), step)
    source, state = read_full_state(folder)
    extra = state["extra"]
    result: dict[str, Any] = {"format": ENCODER_FORMAT}
    if isinstance(extra.get("model"), dict):
        result["model"] = dict(extra["model"])
    if isinstance(extra.get("config"), dict):
        result["config"] = dict(extra["config"])  # the run's pijepa config
    result["step"] = int(extra.get("step", step_of(folder)))
    for part in PARTS:
        result[part] = plain_state_dict(state[part])
    if fmt == "timm":
        write_timm(Path(out), result, which, str(folder))
    elif fmt == "hf":
        write_hf(Path(out), result, which, str(folder))
    else:
        atomic_torch_save(out, result)  # never leaves a half-written file under the final name
    return {"checkpoint": str(folder), "source_format": source.name, "step": result["step"], "format": fmt,
            "which": which if fmt != "pijepa" else "both", **{part: len(result[part]) for part in PARTS}}
