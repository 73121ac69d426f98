"""Gathering the kept patches of each mask (shared by the encoder, the predictor and the loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_masks(x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Keep, for each mask and image, the patches it lists: ``[B, N, D]`` x ``[M, B, K]`` -> ``[M*B, K, D]``.

    Output rows are mask-major (all images for mask 0, then mask 1, ...), exactly the order of
    I-JEPA's ``apply_masks``. ``masks`` may also be a list of ``[B, K]`` tensors (the official call
    style) or a single ``[B, K]`` tensor (M = 1).

    Implemented as one ``index_select`` over the flattened ``[B*N, D]`` tokens instead of one
    ``gather`` per mask: a single kernel, and its backward is one ``index_add`` into ``[B*N, D]``
    rather than M expanded index tensors of width D.
    """
    if not torch.is_tensor(masks):
        masks = torch.stack(list(masks), dim=0)
    elif masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if x.dim() != 3 or masks.dim() != 3 or masks.shape[1] != x.shape[0]:
        raise ValueError(
            f"apply_masks expects x [B, N, D] and masks [M, B, K]; got x {tuple(x.shape)}, "
            f"masks {tuple(masks.shape)}"
        )
    num_masks, batch, keep = masks.shape
    tokens, dim = x.shape[1], x.shape[2]
    # Offset image b's indices by b*N so they address rows of the flattened [B*N, D] view.
    offsets = torch.arange(batch, device=masks.device, dtype=masks.dtype).view(1, batch, 1) * tokens
    flat_index = (masks + offsets).reshape(-1)
    kept = torch.index_select(x.reshape(batch * tokens, dim), 0, flat_index)
    return kept.view(num_masks * batch, keep, dim)
