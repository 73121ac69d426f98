"""The DeepSpeed checkpoint layout, and reading one in a single process (for `pijepa export`).

A step folder written by DeepSpeedStrategy.save holds
    ds/                 DeepSpeed's own `save_checkpoint` (tag "ds"): model and ZeRO optimizer
                        partitions (every rank writes its part; DeepSpeed also writes `latest` and
                        `zero_to_fp32.py` there)
    ds_state.pt         rank 0: format, world size, ZeRO stage, the full fp32 EMA target and `extra`
    rng_rank{r}.pt      rank r's RNG states
Reading it needs the deepspeed package (zero_to_fp32) but no process group and no engine. Every
file is read with torch.load(weights_only=True), DeepSpeed's own included (`_weights_only_loads`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pijepa.parallel.formats import written_by
from pijepa.parallel.parallelize import canonical_name
from pijepa.runtime.errors import CheckpointError, LaunchError

FORMAT = "pijepa-deepspeed-v1"
STATE_FILE = "ds_state.pt"  # its presence identifies the layout (see pijepa/parallel/formats.py)
TAG = "ds"  # DeepSpeed's checkpoint tag: the engine's files go to <step folder>/ds/


def read_head(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a DeepSpeed checkpoint of pijepa, no {STATE_FILE}{written_by(folder)}")
    head = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pijepa DeepSpeed checkpoint (expected format {FORMAT})")
    return head


def is_deepspeed_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def read_full_state(folder: Path) -> dict[str, Any]:
    """Full fp32 encoder / predictor / target state dicts, `extra` and the model description of a
    checkpoint folder, in this one process (any world size at save time); for `pijepa export`.

    The encoder and predictor come from the ZeRO fp32 master partitions, consolidated by
    DeepSpeed's zero_to_fp32 (also in bf16 runs: the master weights, not their bf16 copies)."""
    folder = Path(folder)
    head = read_head(folder)
    with _weights_only_loads(folder):
        # Engine names carry checkpoint_wrapper's part under dist.activation_checkpointing.
        full = {canonical_name(n): v for n, v in _fp32_master_weights(folder, head).items()}
    # Frozen parameters (the fixed sin-cos positional embeddings) have no fp32 master: ZeRO-1
    # checkpoints leave them out of the consolidated dict and ZeRO-2/3 keep the module's copy (bf16
    # in bf16 runs). The encoder's are taken from the fp32 EMA target (never updated, so equal to
    # the encoder's), the predictor's from the module state that DeepSpeed saved.
    frozen = set(head["frozen"])
    full.update({f"encoder.{n}": v for n, v in head["target_encoder"].items() if f"encoder.{n}" in frozen})
    module_state = None
    for name in sorted(frozen - set(full)):
        if module_state is None:
            module_state = torch.load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                                      weights_only=True)["module"]
        full[name] = module_state[name]
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "predictor": {}}
    for name, tensor in full.items():
        owner, _, rest = name.partition(".")
        if owner not in parts:
            raise CheckpointError(f"{folder}: unexpected parameter {name!r} in the DeepSpeed checkpoint")
        parts[owner][rest] = tensor.float()
    return {**parts, "target_encoder": head["target_encoder"], "extra": head["extra"],
            "model": dict(head["extra"].get("model", {}))}


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_WHY = "WeightsUnpickler error:"  # torch's line naming what a weights-only load refused


@contextlib.contextmanager
def _weights_only_loads(folder: Path) -> Iterator[None]:
    """Every torch.load inside reads with weights_only=True, DeepSpeed's zero_to_fp32 included
    (it passes weights_only=False itself; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that):
    no pickled code runs. The only non-tensor objects DeepSpeed's files hold are plain records,
    admitted by name: the ZeRO stage (an IntEnum), the static loss scaler's two fields (cur_scale,
    dynamic) and the fragment addresses (numel, start) of BF16_Optimizer's parameter map."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise LaunchError(f"{folder}: reading a DeepSpeed checkpoint needs the deepspeed package: "
                          f"pip install -e '.[deepspeed]'") from None
    before = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    except pickle.UnpicklingError as e:  # torch's message spans a page: keep the line naming the object
        why = next((line.split(_WHY, 1)[1].split(". Please", 1)[0].strip()
                    for line in str(e).splitlines() if _WHY in line), str(e).strip().splitlines()[0])
        raise CheckpointError(f"{folder}: a DeepSpeed file holds an object that a weights-only load does not "
                              f"admit ({why}); pijepa export runs no code from a checkpoint") from None
    finally:
        if before is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = before


def _fp32_master_weights(folder: Path, head: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Consolidated fp32 master weights of the trained parameters, by engine parameter name."""
    if head.get("optimizer") == "BF16_Optimizer":  # ZeRO-1 + bf16 + fp32 gradient accumulation
        return _merge_bf16_optimizer_partitions(folder / TAG)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))


def _merge_bf16_optimizer_partitions(ds_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer checkpoint, which zero_to_fp32 does not read: every rank's file
    holds its fp32 partition of each param group and, per parameter name, the fragment of it that
    the partition holds (offset, length). A parameter's fragments, in rank order, are its elements."""
    files = sorted(ds_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(f.name.split("_")[4]))
    model_states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, fragment in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    return {name: torch.cat(parts).view(shapes[name]) for name, parts in pieces.items()}
