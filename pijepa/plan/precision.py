"""Byte widths of what a strategy computes and keeps; each cost model says which apply to it."""

from __future__ import annotations

from dataclasses import dataclass

FP32, BF16 = 4, 2


@dataclass(frozen=True)
class Precision:
    compute: int  # bytes per element of matmul inputs / outputs
    residual: int  # bytes per element of the residual stream (LayerNorm inputs)
    weights: int  # bytes per element of the weights used in forward (gathered / cast / module copy)


FULL_FP32 = Precision(FP32, FP32, FP32)
FULL_BF16 = Precision(BF16, BF16, BF16)  # FSDP param_dtype bf16, DeepSpeed bf16 module
