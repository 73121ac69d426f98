"""The machines `pijepa plan` sizes a run for, and the memory a GPU loses to everything but tensors."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
MiB = 2**20

CUDA_OVERHEAD = 2 * GiB  # CUDA context (~0.5 GiB), NCCL communicators and buffers, cuBLAS workspaces
ALLOCATOR_SLACK = 0.10  # reserved-but-unallocated memory of the caching allocator, fraction of the peak


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory: int  # bytes
    bf16_flops: float  # dense bf16 peak, FLOP/s


# Device memory as nvidia-smi reports it, and the datasheet dense bf16 tensor-core peak (SXM parts).
GPUS: dict[str, GPUSpec] = {
    "a100-40gb": GPUSpec("A100-SXM4-40GB", 40960 * MiB, 312e12),
    "a100-80gb": GPUSpec("A100-SXM4-80GB", 81920 * MiB, 312e12),
    "h100-80gb": GPUSpec("H100-SXM5-80GB", 81559 * MiB, 989e12),
    "h200-141gb": GPUSpec("H200-SXM-141GB", 143771 * MiB, 989e12),
}
