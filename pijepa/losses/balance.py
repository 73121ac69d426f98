"""The PKT weight that reproduces the published balance of the two loss terms at given shapes.

The published Probabilistic I-JEPA code trains with ``L2_PKT_chunks`` = (sum over chunks of
PKT_chunk + L2) / n_chunks, n_chunks = R / chunk_size for the R predicted tokens of one device's
micro-batch. AdamW's update does not change when the loss is multiplied by a constant (up to its
epsilon), so that objective trains like L2 + n_chunks x (mean chunk PKT): ``L2_PKT`` with
``pkt_weight = n_chunks``. The published balance therefore depends on the per-device batch, the
number and size of the target blocks and the chunk size, and moves whenever one of them does (e.g.
with the number of GPUs at a fixed global batch). ``L2_PKT`` with an explicit ``pkt_weight`` keeps
one objective at any scale (its chunk mean does not depend on the batch); the recipes carry the
weight that equals the published balance at the published per-device shapes, computed here.
"""

from __future__ import annotations


def published_pkt_weight(batch_per_device: int, num_targets: int, mean_target_tokens: float,
                         chunk_size: int) -> float:
    """n_chunks = R / chunk_size with R = batch x targets x mean target tokens: the pkt_weight of
    ``L2_PKT`` equal (under AdamW) to ``L2_PKT_chunks`` at these per-device shapes."""
    return batch_per_device * num_targets * mean_target_tokens / chunk_size
