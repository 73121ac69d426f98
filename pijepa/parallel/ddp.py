"""Plain DDP: replicated encoder and predictor, one `state.pt` per checkpoint (single.py's format).

`dist.activation_checkpointing` and `dist.compile` are applied in `wrap`, after SingleStrategy has
built the optimizer and the EMA pairs and before DistributedDataParallel: AC wraps the blocks and
compile works in place, so those keep holding the same parameters, and the state-dict names
(checkpoint_wrapper strips its prefix from them) stay those of the plain models."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch.nn.parallel import DistributedDataParallel

from pijepa.parallel.base import JEPAModels, start_process_group
from pijepa.parallel.options import DistConfig
from pijepa.parallel.single import SingleStrategy
from pijepa.runtime.errors import LaunchError


class DDPStrategy(SingleStrategy):
    """Replicated encoder and predictor under DistributedDataParallel; the target is replicated and
    updated identically on every rank, so it needs no communication."""

    def __init__(self, dist_cfg: DistConfig | None = None) -> None:
        super().__init__(dist_cfg)
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise LaunchError("dist.strategy ddp needs a distributed launch (torchrun sets RANK, "
                               "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); run it under torchrun")
        start_process_group(self.cfg.timeout)

    def wrap(self, models: JEPAModels) -> JEPAModels:
        models = super().wrap(models)  # AC -> compile, then DDP: the order FSDP uses
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = [DistributedDataParallel(m, device_ids=ids) for m in models.trainable()]
        return JEPAModels(self._ddp[0], self._ddp[1], models.target_encoder)

    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if not is_last:  # no gradient all-reduce on non-final micro-steps
                for m in self._ddp:
                    stack.enter_context(m.no_sync())
            yield
