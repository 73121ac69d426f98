"""Loss registry: ``build_loss(name, ...)`` returns ``loss_fn(pred, h, masks_pred) -> (loss, parts)``.

All losses follow docs/contracts.md: ``pred [M*B, K, D]`` (mask-major predictor output), ``h [B, N,
D]`` (raw target-encoder output; the loss applies the affine-free LayerNorm and never sends
gradient into it), ``masks_pred [M, B, K]``. ``parts`` holds detached float32 scalars ``l2`` and/or
``pkt`` (the grouped PKT mean, whatever the loss's own normalisation) for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from pijepa.losses.fused import fused_terms
from pijepa.losses.pkt import GROUPINGS, grouped_pkt
from pijepa.losses.regression import normalize_targets, smooth_l1
from pijepa.masks import apply_masks

LossName = Literal["L2", "PKT", "L2_PKT", "L2_PKT_chunks"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
_USES_L2 = ("L2", "L2_PKT", "L2_PKT_chunks")
_USES_PKT = ("PKT", "L2_PKT", "L2_PKT_chunks")


def plain_terms(
    pred: torch.Tensor,
    h: torch.Tensor,
    masks_pred: torch.Tensor,
    *,
    with_l2: bool,
    with_pkt: bool,
    grouping: str,
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reference path: LayerNorm all of ``h``, gather, smooth L1, then PKT group by group."""
    target = apply_masks(normalize_targets(h), masks_pred)  # [M*B, K, D] float32
    l2 = smooth_l1(pred, target) if with_l2 else None
    pkt = grouped_pkt(pred, target, masks_pred.shape[0], grouping, chunk_size) if with_pkt else None
    return l2, pkt


def contributions(
    name: str,
    l2: torch.Tensor | None,
    pkt_groups: torch.Tensor | None,
    *,
    num_rows: int,
    chunk_size: int,
    l2_weight: float,
    pkt_weight: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The loss named ``name`` as its weighted terms (they sum to the loss; the trainer takes each
    term's gradient on the predictions from them), plus the detached logging parts."""
    parts: dict[str, torch.Tensor] = {}
    if l2 is not None:
        parts["l2"] = l2.detach()
    if pkt_groups is not None:
        parts["pkt"] = pkt_groups.mean().detach()
    if name == "L2":
        assert l2 is not None
        return {"l2": l2}, parts
    assert pkt_groups is not None
    if name == "PKT":
        return {"pkt": pkt_groups.mean()}, parts
    assert l2 is not None
    if name == "L2_PKT":
        return {"l2": l2_weight * l2, "pkt": pkt_weight * pkt_groups.mean()}, parts
    # L2_PKT_chunks: the published code sums the chunk PKTs onto L2, then divides by R / chunk_size.
    chunks = num_rows / chunk_size
    return {"l2": l2_weight * l2 / chunks, "pkt": pkt_weight * pkt_groups.sum() / chunks}, parts


def sum_terms(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    total, *rest = terms.values()
    for term in rest:
        total = total + term
    return total


@dataclass(frozen=True)
class JepaLoss:
    """A configured JEPA loss; call it as ``loss_fn(pred, h, masks_pred) -> (loss, parts)``.

    ``L2``: I-JEPA's smooth L1 (beta 1) between the predictions and the LayerNormed targets.
    ``PKT``: the grouped PKT alone. ``L2_PKT``: ``l2_weight * L2 + pkt_weight * PKT``, PKT being the
    mean over groups of each group's PKT.

    ``L2_PKT_chunks`` reproduces the published Probabilistic I-JEPA code: ``(sum over chunks of
    PKT_chunk + L2) / (R / chunk_size)`` with R = M*B*K predicted tokens (weights, when not 1,
    multiply the two terms inside). Compared with ``L2_PKT`` this divides L2 by the number of
    chunks, R / chunk_size, so the regression term is down-weighted by a factor that grows with the
    per-device batch and the target block size (about 1/80 for 128 images per device with four
    40-token targets and 256-row chunks) and changes whenever the batch size, device count or mask
    scales change; the PKT term gets weight ceil(R / C) / (R / C), exactly 1 when chunk_size
    divides R and slightly above 1 otherwise (and above 1 by a lot when chunk_size > R). ``L2_PKT``
    keeps both weights explicit and independent of the batch geometry; ``parts`` report the same
    unweighted L2 and mean PKT for both.
    """

    name: str
    grouping: str = "chunk"
    chunk_size: int = 256
    l2_weight: float = 1.0
    pkt_weight: float = 1.0
    fused: bool = True

    def __call__(
        self, pred: torch.Tensor, h: torch.Tensor, masks_pred: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms, parts = self.terms(pred, h, masks_pred)
        return sum_terms(terms), parts

    def terms(
        self, pred: torch.Tensor, h: torch.Tensor, masks_pred: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The loss as its weighted terms (``l2``, ``pkt``: they sum to the loss) and the parts."""
        _check_shapes(pred, h, masks_pred)
        terms = fused_terms if self.fused else plain_terms
        l2, pkt_groups = terms(
            pred,
            h,
            masks_pred,
            with_l2=self.name in _USES_L2,
            with_pkt=self.name in _USES_PKT,
            grouping=self.grouping,
            chunk_size=self.chunk_size,
        )
        return contributions(
            self.name,
            l2,
            pkt_groups,
            num_rows=masks_pred.numel(),
            chunk_size=self.chunk_size,
            l2_weight=self.l2_weight,
            pkt_weight=self.pkt_weight,
        )


def _check_shapes(pred: torch.Tensor, h: torch.Tensor, masks_pred: torch.Tensor) -> None:
    ok = h.dim() == 3 and masks_pred.dim() == 3 and pred.dim() == 3
    if ok:
        num_masks, batch, keep = masks_pred.shape
        ok = h.shape[0] == batch and tuple(pred.shape) == (num_masks * batch, keep, h.shape[2])
    if not ok:
        raise ValueError(
            "loss expects pred [M*B, K, D], h [B, N, D], masks_pred [M, B, K]; got pred "
            f"{tuple(pred.shape)}, h {tuple(h.shape)}, masks_pred {tuple(masks_pred.shape)}"
        )


def build_loss(
    name: str,
    *,
    grouping: str = "chunk",
    chunk_size: int = 256,
    l2_weight: float = 1.0,
    pkt_weight: float = 1.0,
    fused: bool = True,
) -> JepaLoss:
    """The loss ``name`` (one of ``LOSS_NAMES``); ``fused=False`` selects the plain reference path."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")
    if grouping not in GROUPINGS:
        raise ValueError(f"loss grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    if name == "L2_PKT_chunks" and grouping != "chunk":
        raise ValueError(
            f"L2_PKT_chunks reproduces the published chunked PKT; grouping must be 'chunk', got {grouping!r}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"loss chunk_size must be an int >= 1, got {chunk_size!r}")
    return JepaLoss(name, grouping, chunk_size, float(l2_weight), float(pkt_weight), bool(fused))
