"""Analytic FLOPs of the JEPA training step (matmuls only), for the planner's step time and the
benchmarks' MFU."""

from __future__ import annotations


def transformer_flops(tokens: float, seqs: float, width: int, depth: int, mlp_hidden: int) -> float:
    """Forward matmul FLOPs of `depth` pre-norm blocks over `seqs` sequences of `tokens` tokens."""
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp_hidden)
    attention = 2 * 2 * tokens * tokens * width  # q k^T and attn v
    return seqs * depth * (linear + attention)


def step_flops(encoder, predictor, batch: int, n_ctx: float, n_tgt: float, num_targets: int,
               pkt_rows_per_group: float) -> float:
    """FLOPs of one training step: target forward, context and predictor forward + backward (x3)."""
    d, depth = encoder.embed_dim, len(encoder.blocks)
    hidden = encoder.blocks[0].mlp.fc1.out_features
    n_all = encoder.num_patches
    patch = 2 * n_all * encoder.patch_embed.proj.weight[0].numel() * d
    target = batch * patch + transformer_flops(n_all, batch, d, depth, hidden)
    context = batch * patch + transformer_flops(n_ctx, batch, d, depth, hidden)
    dp = predictor.predictor_embed.out_features
    p_hidden = predictor.predictor_blocks[0].mlp.fc1.out_features
    seqs = batch * num_targets
    pred = (transformer_flops(n_ctx + n_tgt, seqs, dp, len(predictor.predictor_blocks), p_hidden)
            + 2 * seqs * n_ctx * d * dp + 2 * seqs * n_tgt * dp * d)
    rows = seqs * n_tgt
    loss = 2 * 2 * rows * pkt_rows_per_group * d  # two similarity matrices per group
    return target + 3 * (context + pred + loss)
