"""Fused JEPA loss terms: one gather of the targets, batched PKT over all groups.

Compared with the plain path (LayerNorm all of ``h``, gather, loop over groups) this

- gathers the target rows once (one ``index_select`` over ``[B*N, D]`` in mask-major order) and
  LayerNorms only those rows: LayerNorm is per token, so gather-then-normalise equals
  normalise-then-gather and skips the unused tokens;
- computes every group's similarity matrix with one ``bmm`` per side over ``[G, C, D]``. For the
  ``chunk`` grouping the rows are zero-padded to ``G*C``; padded rows are zero after the unit-row
  normalisation, so they add nothing to the row sums computed below, and they are removed exactly
  from the KL by zeroing the target distribution on padded rows and columns.

Algebra that saves passes over the ``[G, C, C]`` tensors (p_i unit rows, S = P P^T, n = rows in
the group): the row sums of (S + 1) / 2 are (p_i . sum_j p_j + n) / 2, a mat-vec instead of a
reduction, so with d_i = p_i . sum_j p_j + n the distribution is P_ij = (S_ij + 1) / d_i and
log(P_ij + eps) = log(S_ij + 1 + eps d_i) - log d_i. The KL sum of a group is then
sum T log(T + eps) - sum T log(S + 1 + eps d) + sum_i (sum_j T_ij) log d_i: no division of the
prediction matrix and one log over it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pijepa.losses.pkt import GROUPINGS, PKT_EPS, unit_rows
from pijepa.losses.regression import at_least_fp32, fp32_region, normalize_targets, smooth_l1
from pijepa.masks import apply_masks


def group_rows(
    rows: torch.Tensor, num_masks: int, keep: int, grouping: str, chunk_size: int
) -> tuple[torch.Tensor, int]:
    """Mask-major rows ``[R, D]`` -> ``([G, C, D], rows in the last group)``; zero-pads chunks."""
    num_rows, dim = rows.shape
    if grouping == "chunk":
        size = min(chunk_size, num_rows)
        groups = -(-num_rows // size)
        pad = groups * size - num_rows
        padded = F.pad(rows, (0, 0, 0, pad)) if pad else rows
        return padded.view(groups, size, dim), size - pad
    if grouping == "block":
        return rows.view(-1, keep, dim), keep
    if grouping == "image":
        batch = num_rows // (num_masks * keep)
        per_image = rows.view(num_masks, batch, keep, dim).transpose(0, 1)
        return per_image.reshape(batch, num_masks * keep, dim), num_masks * keep
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-group ``sum(a * b)`` over ``[G, C, C]`` (a bmm-based dot is ~5x slower on CPU)."""
    return (a * b).sum((1, 2))


class _Gram(torch.autograd.Function):
    """``x x^T`` per group with a one-GEMM backward.

    Autograd's bmm backward runs two GEMMs (one per operand); since both operands are ``x`` the
    gradient is ``(g + g^T) x``: one cheap elementwise add instead of a second GEMM.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.bmm(x, x.mT)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.bmm(grad + grad.mT, x)


def batched_pkt(pred: torch.Tensor, target: torch.Tensor, last: int, eps: float = PKT_EPS) -> torch.Tensor:
    """Per-group PKT ``[G]`` of unit rows ``[G, C, D]`` (at least float32); only the last group may be padded.

    ``last`` is the number of real rows in the last group; the others hold C real rows.
    """
    with fp32_region(pred):
        return _batched_pkt(at_least_fp32(pred), at_least_fp32(target.detach()), last, eps)


def _batched_pkt(pred: torch.Tensor, target: torch.Tensor, last: int, eps: float) -> torch.Tensor:
    groups, size, _ = pred.shape
    counts = torch.full((groups,), float(size), dtype=pred.dtype, device=pred.device)
    counts[-1] = last
    n = counts.view(groups, 1, 1)
    with torch.no_grad():
        t = torch.bmm(target, target.mT)
        d_t = torch.bmm(target, target.sum(1, keepdim=True).mT).add_(n)  # [G, C, 1]
        t.add_(1.0).div_(d_t)
        if last < size:  # padding contributes nothing: zero its rows and columns of T
            t[-1, last:].zero_()
            t[-1, :, last:].zero_()
        t_rows = t.sum(-1)  # 1 on real rows, 0 on padded ones
        neg_entropy = _dot(t, torch.log(t + eps))
    d_p = torch.bmm(pred, pred.sum(1, keepdim=True).mT) + n  # [G, C, 1]
    # In place on the fresh Gram output: its backward needs only its input.
    log_p = torch.log(_Gram.apply(pred).add_(1.0 + eps * d_p))
    kl = neg_entropy - _dot(t, log_p) + (t_rows * torch.log(d_p.squeeze(-1))).sum(-1)
    return kl / counts**2


def fused_terms(
    pred: torch.Tensor,
    h: torch.Tensor,
    masks_pred: torch.Tensor,
    *,
    with_l2: bool,
    with_pkt: bool,
    grouping: str,
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(smooth L1, per-group PKT [G])`` (each None unless asked) without loops over groups."""
    num_masks, _, keep = masks_pred.shape
    dim = pred.shape[-1]
    with fp32_region(pred):
        # One gather of the raw target rows, then LayerNorm of just those rows.
        target = normalize_targets(apply_masks(h.detach(), masks_pred).view(-1, dim))
        rows = pred.reshape(-1, dim).float()
        l2 = smooth_l1(rows, target) if with_l2 else None
        if not with_pkt:
            return l2, None
        p, last = group_rows(unit_rows(rows), num_masks, keep, grouping, chunk_size)
        t, _ = group_rows(unit_rows(target), num_masks, keep, grouping, chunk_size)
        return l2, batched_pkt(p, t, last)
