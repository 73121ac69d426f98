"""The pretrained arms of `pijepa reproduce`, from `--arms`, and the published PKT balance at the
run's own shapes.

`--arms` is a comma-separated list of:

- ``L2``: I-JEPA;
- ``L2_PKT``: Probabilistic I-JEPA with the config's ``l2_weight`` / ``pkt_weight``;
- ``L2_PKT_chunks``: the published code's loss, (sum of chunk PKTs + L2) / n_chunks, weights 1 / 1;
- ``L2_PKT@<weight>``: ``L2_PKT`` with ``l2_weight`` 1 and that ``pkt_weight`` (e.g. ``L2_PKT@1e3``);
- ``L2_PKT@published``: ``L2_PKT`` with ``l2_weight`` 1 and the ``pkt_weight`` that equals the
  published ``L2_PKT_chunks`` balance at this run's per-device shapes (``published_pkt_weight`` of
  its batch, number of target blocks, mean target-block tokens on its grid and chunk size).

The random-init encoder is always evaluated beside them (`spec.RANDOM`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pijepa.commands.reproduce.spec import BASELINE, Arm
from pijepa.runtime.errors import ConfigError

if TYPE_CHECKING:
    from pijepa.config import Config

ARM_FORMS = "L2, L2_PKT_chunks, L2_PKT, L2_PKT@<weight> (e.g. L2_PKT@1e3), L2_PKT@published"
PUBLISHED = "published"
LOSSES = ("L2", "L2_PKT_chunks", "L2_PKT")
LABELS = {"L2": "I-JEPA (L2)", "L2_PKT": "Prob. I-JEPA (L2_PKT)",
          "L2_PKT_chunks": "Prob. I-JEPA, published loss (L2_PKT_chunks)"}
COLORS = {"L2": "tab:blue", "L2_PKT": "tab:red"}
PALETTE = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


@dataclass(frozen=True)
class ArmRequest:
    """One `--arms` entry, before the config (and so the published balance) is known."""

    key: str  # results key and run-name prefix
    loss: str  # optimization.loss_function
    weight: float | None = None  # explicit pkt_weight (with l2_weight 1); None: see `published`
    published: bool = False  # pkt_weight = the published L2_PKT_chunks balance at the run's shapes


@dataclass(frozen=True)
class Balance:
    """The published ``L2_PKT_chunks`` balance at one run's per-device shapes, as an ``L2_PKT`` pkt_weight."""

    weight: float
    batch_per_device: int
    num_targets: int
    mean_target_tokens: float
    chunk_size: int
    grid: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return (f"{self.batch_per_device} images per device × {self.num_targets} target blocks × "
                f"{self.mean_target_tokens:.2f} mean tokens per block ({self.grid[0]}x{self.grid[1]} grid) / "
                f"chunk {self.chunk_size} = **{self.weight:.4g}**")


def weight_text(weight: float) -> str:
    """1000.0 -> "1000", 1e6 -> "1e6", 0.5 -> "0.5": short enough for a run name."""
    return f"{weight:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _request(item: str, text: str) -> ArmRequest:
    if item in LOSSES:
        return ArmRequest(item, item)
    head, sep, tail = item.partition("@")
    if head != "L2_PKT" or not sep:
        raise ConfigError(f"--arms {text!r}: unknown arm {item!r}; expected a comma-separated list of {ARM_FORMS}")
    if tail == PUBLISHED:
        return ArmRequest(item, "L2_PKT", published=True)
    try:
        weight = float(tail)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"--arms {text!r}: {item!r} needs a pkt_weight >= 0 after '@' (e.g. L2_PKT@1e3) "
                          f"or '{PUBLISHED}'")
    return ArmRequest(f"L2_PKT@{weight_text(weight)}", "L2_PKT", weight)


def parse_arms(text: str) -> list[ArmRequest]:
    """`--arms` as requests in the given order, duplicates (same run name) dropped; one-line ConfigError."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"--arms {text!r}: expected a comma-separated list of {ARM_FORMS}")
    requests: dict[str, ArmRequest] = {}
    for item in items:
        request = _request(item, text)
        requests.setdefault(request.key, request)
    return list(requests.values())


def published_balance(cfg: Config) -> Balance:
    """`published_pkt_weight` at the resolved config's shapes: per-device batch, target blocks, their mean
    tokens (the config's pred masks on its patch grid) and the PKT chunk size."""
    from pijepa.losses.balance import published_pkt_weight
    from pijepa.masks.multiblock import mean_block_area

    k, o = cfg.mask, cfg.optimization
    side = cfg.data.crop_size // k.patch_size
    grid = (side, side)
    tokens = mean_block_area((k.pred_mask_scale[0], k.pred_mask_scale[1]), (k.aspect_ratio[0], k.aspect_ratio[1]),
                             grid)
    weight = published_pkt_weight(cfg.data.micro_batch, k.num_pred_masks, tokens, o.pkt_chunk_size)
    return Balance(weight, cfg.data.micro_batch, k.num_pred_masks, tokens, o.pkt_chunk_size, grid)


def _sets(request: ArmRequest, balance: Balance) -> tuple[str, ...]:
    loss = (f"optimization.loss_function={request.loss}",)
    if request.loss == "L2_PKT_chunks":  # the published code has no weights
        return (*loss, "optimization.l2_weight=1", "optimization.pkt_weight=1")
    weight = balance.weight if request.published else request.weight
    if weight is None:
        return loss
    return (*loss, "optimization.l2_weight=1", f"optimization.pkt_weight={weight!r}")


def _label(request: ArmRequest, balance: Balance) -> str:
    if request.published:
        return f"Prob. I-JEPA (L2_PKT, published balance {balance.weight:.3g})"
    if request.weight is not None:
        return f"Prob. I-JEPA (L2_PKT, pkt_weight {weight_text(request.weight)})"
    return LABELS[request.loss]


def build_arms(requests: list[ArmRequest], balance: Balance) -> tuple[Arm, ...]:
    arms, extra = [], 0
    for request in requests:
        color = COLORS.get(request.key)
        if color is None:
            color, extra = PALETTE[extra % len(PALETTE)], extra + 1
        arms.append(Arm(request.key, _label(request, balance), _sets(request, balance), color))
    return tuple(arms)


def versus_baseline(arms: tuple[Arm, ...]) -> list[tuple[str, str]]:
    """(baseline, candidate) pairs: every other arm against L2, when L2 is one of the arms."""
    keys = [a.key for a in arms]
    return [(BASELINE, k) for k in keys if k != BASELINE] if BASELINE in keys else []
