"""Probabilistic Knowledge Transfer (Passalis & Tefas, 2018): plain, per-group reference version.

PKT compares the pairwise cosine-similarity distributions of two row sets instead of the rows
themselves: each row's similarities to all rows of its group, mapped to [0, 1] and normalised to
sum 1, form a probability distribution; the loss is KL(target || prediction) averaged over all
entries. Rows are grouped (``GROUPINGS``) into separate similarity matrices; the grouped value is
the mean over groups of each group's PKT. The fused, batched version lives in ``fused.py``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from pijepa.losses.regression import fp32_region

PKT_EPS = 1e-7
PktGrouping = Literal["chunk", "image", "block"]
GROUPINGS: tuple[str, ...] = get_args(PktGrouping)


def unit_rows(x: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """Rows divided by their L2 norm plus ``eps`` (PKT's normalisation; zero rows stay zero)."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def pkt_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """PKT between two ``[R, D]`` row sets, always in float32; the target carries no gradient."""
    with fp32_region(pred):
        p = unit_rows(pred.float(), eps)
        with torch.no_grad():
            t = unit_rows(target.detach().float(), eps)
            sim_t = (t @ t.T + 1.0) / 2.0
            sim_t = sim_t / sim_t.sum(dim=1, keepdim=True)
        sim_p = (p @ p.T + 1.0) / 2.0
        sim_p = sim_p / sim_p.sum(dim=1, keepdim=True)
        return torch.mean(sim_t * torch.log((sim_t + eps) / (sim_p + eps)))


def split_groups(x: torch.Tensor, num_masks: int, grouping: str, chunk_size: int) -> list[torch.Tensor]:
    """Row groups of mask-major tokens ``[M*B, K, D]``, the plain way (lists of ``[rows, D]``).

    ``chunk``: all tokens flattened mask-major, cut into contiguous ``chunk_size`` rows (the last
    may be shorter), as the published Probabilistic I-JEPA runs did. ``image``: the M*K tokens of
    one image over its M target blocks. ``block``: the K tokens of one (mask, image) sequence.
    """
    dim = x.shape[-1]
    if grouping == "chunk":
        return list(x.reshape(-1, dim).split(chunk_size))
    if grouping == "block":
        return list(x.unbind(0))
    if grouping == "image":
        batch = x.shape[0] // num_masks
        return [torch.cat([x[m * batch + b] for m in range(num_masks)]) for b in range(batch)]
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


def grouped_pkt(
    pred: torch.Tensor, target: torch.Tensor, num_masks: int, grouping: str, chunk_size: int
) -> torch.Tensor:
    """Per-group PKT values ``[G]`` for mask-major ``[M*B, K, D]`` tokens: a Python loop over groups."""
    pairs = zip(
        split_groups(pred, num_masks, grouping, chunk_size), split_groups(target, num_masks, grouping, chunk_size)
    )
    return torch.stack([pkt_loss(p, t) for p, t in pairs])
