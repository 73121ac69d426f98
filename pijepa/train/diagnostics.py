"""What a log step measures besides the loss: how hard each loss term pushes the
predictions, and whether the target's features collapse.

- `grad_l2`, `grad_pkt`: the norm of each weighted loss term's gradient with respect to the
  predictor's output (the tokens the loss compares), taken with autograd on the loss's own graph
  only (it stops at the predictions: the encoder and predictor are not traversed), so it costs a
  fraction of a backward pass and runs only at log steps. `grad_share_pkt` = grad_pkt /
  (grad_l2 + grad_pkt): 0 when PKT does not move the predictions, 1 when only PKT does.
- `target_std`: the standard deviation over the batch of the target's pooled features (the
  LayerNorm-ed target tokens the loss regresses on, averaged over positions), averaged over
  channels; it falls towards 0 when every image gets the same representation.
- `target_rank`: RankMe's effective rank of the same pooled features, exp(entropy) of their
  normalised singular values (Garrido et al., 2023): between 1 (collapsed to one direction) and
  min(batch, width). Measured on each rank's micro-batch, then averaged over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANK_EPS = 1e-7  # RankMe's epsilon in p_k = sigma_k / sum(sigma) + eps


def term_gradient_norms(terms: dict[str, torch.Tensor], predictions: torch.Tensor) -> dict[str, torch.Tensor]:
    """`grad_<term>` for each weighted term, and `grad_share_pkt` when both L2 and PKT are there."""
    norms: dict[str, torch.Tensor] = {}
    for name, term in terms.items():
        (grad,) = torch.autograd.grad(term, predictions, retain_graph=True, allow_unused=True)
        zero = predictions.new_zeros((), dtype=torch.float32)
        norms[f"grad_{name}"] = grad.float().norm() if grad is not None else zero
    if "grad_l2" in norms and "grad_pkt" in norms:
        both = norms["grad_l2"] + norms["grad_pkt"]
        norms["grad_share_pkt"] = norms["grad_pkt"] / both.clamp_min(torch.finfo(torch.float32).tiny)
    return norms


def collapse_stats(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """`target_std` and `target_rank` of the target encoder's output h [B, N, D]."""
    with torch.no_grad():
        tokens = h.detach().float()
        pooled = F.layer_norm(tokens, tokens.shape[-1:]).mean(1)  # [B, D]
        std = pooled.std(0).mean() if pooled.shape[0] > 1 else pooled.new_zeros(())
        # A diverged step has non-finite targets, on which the SVD fails: its rank is NaN instead
        # (decided on the device, no host sync).
        finite = torch.isfinite(pooled).all()
        sigma = torch.linalg.svdvals(torch.where(finite, pooled, torch.zeros_like(pooled)))
        p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float32).tiny) + RANK_EPS
        rank = torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full_like(std, float("nan")))
    return {"target_std": std, "target_rank": rank}
