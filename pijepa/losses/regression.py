"""I-JEPA's regression loss and the target normalisation it uses."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on ``x``'s device: losses are computed in float32 even in bf16 runs."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs go up to float32; float32/float64 stay (float64 serves gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalize_targets(h: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm over the feature dim in float32, without gradient (I-JEPA's targets)."""
    h = h.detach()
    with fp32_region(h):
        return F.layer_norm(h.float(), (h.shape[-1],))


def smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 1), mean over all elements, in float32 (I-JEPA's loss between z and h)."""
    with fp32_region(pred):
        return F.smooth_l1_loss(pred.float(), target.float(), beta=1.0)
