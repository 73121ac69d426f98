"""One process (CPU or one GPU): plain models, one `state.pt` per checkpoint; DDP builds on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pijepa.parallel.base import (
    JEPAModels,
    Strategy,
    ema_update_,
    make_adamw,
    param_groups,
    regroup_optimizer_state,
    set_lr_wd,
    step_if_finite,
)
from pijepa.parallel.formats import written_by
from pijepa.parallel.options import DistConfig
from pijepa.parallel.parallelize import prepare_blocks
from pijepa.runtime.errors import CheckpointError

STATE_FILE = "state.pt"
FORMAT = "pijepa-checkpoint-v1"


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class SingleStrategy(Strategy):
    """Everything in one process; also the base of DDP, which only adds the wrapping."""

    def __init__(self, dist_cfg: DistConfig | None = None) -> None:
        super().__init__()
        self.cfg = dist_cfg or DistConfig()

    def setup(self, models: JEPAModels, accum_steps: int, clip_grad: float,
              optimizer_kwargs: dict[str, Any]) -> JEPAModels:
        self.device = pick_device(self.local_rank)
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.models = JEPAModels(*(m.to(self.device) for m in (models.encoder, models.predictor,
                                                               models.target_encoder)))
        self.models.target_encoder.requires_grad_(False)
        self.params = [p for m in self.models.trainable() for p in m.parameters() if p.requires_grad]
        self.optimizer = make_adamw(param_groups(self.models), self.device, **optimizer_kwargs)
        # EMA pairs by name: the target is a copy of the encoder, so the names match one to one.
        online = dict(self.models.encoder.named_parameters())
        self._ema_pairs = [(p, online[n]) for n, p in self.models.target_encoder.named_parameters()
                           if online[n].requires_grad]
        return self.wrap(self.models)

    def wrap(self, models: JEPAModels) -> JEPAModels:
        c = self.cfg  # AC -> compile, the order FSDP uses (see parallelize.py)
        prepare_blocks(models.trainable(), models.target_encoder, c.activation_checkpointing, c.ac_every, c.compile)
        return models

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def optimizer_step(self, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        set_lr_wd(self.optimizer, lr, weight_decay)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # DDP: reduced, alike on every rank
        return grad_norm, step_if_finite(self.optimizer, self.params, grad_norm, self.clip_grad)

    def ema_update(self, momentum: float) -> None:
        target, online = zip(*self._ema_pairs)
        ema_update_(list(target), list(online), momentum)

    def state(self) -> dict[str, Any]:
        return {
            "encoder": self.models.encoder.state_dict(),
            "predictor": self.models.predictor.state_dict(),
            "target_encoder": self.models.target_encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        def write() -> None:
            if self.is_main:
                torch.save({"format": FORMAT, **self.state(), "extra": extra}, folder / STATE_FILE)

        self.agree_on_write(folder, write)

    def load(self, folder: Path) -> dict[str, Any]:
        path = Path(folder) / STATE_FILE
        state = read_state(path, self.device)
        for name in ("encoder", "predictor", "target_encoder"):
            try:
                getattr(self.models, name).load_state_dict(state[name])
            except RuntimeError as e:  # torch lists every mismatch on its own line: show the first
                problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
                first = problems[0] if problems else e
                raise CheckpointError(f"{path}: {name} does not match this run's architecture "
                                      f"({len(problems)} problem(s), first: {first})") from None
        self.optimizer.load_state_dict(regroup_optimizer_state(state["optimizer"], self.optimizer, self.models))
        return state["extra"]


def read_full_state(folder: Path) -> dict[str, Any]:
    """Encoder / predictor / target state dicts and `extra` of a checkpoint folder written by
    `SingleStrategy` or `DDPStrategy` (its `state.pt`); for `pijepa export`."""
    state = read_state(Path(folder) / STATE_FILE, torch.device("cpu"))
    return {name: state[name] for name in ("encoder", "predictor", "target_encoder", "extra")}


def read_state(path: Path, device: torch.device) -> dict[str, Any]:
    """A `state.pt`, loaded with weights_only (a damaged file raises what torch.load raises: the
    Checkpointer sets such a checkpoint aside); a folder of another strategy, or a file of another
    kind, is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: not a checkpoint of dist.strategy single or ddp, no "
                              f"{STATE_FILE}{written_by(path.parent)}")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pijepa checkpoint (expected format {FORMAT})")
    return state
