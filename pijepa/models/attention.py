"""Multi-head self-attention behind one backend switch.

Backends (``attn_backend``):

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks flash /
  memory-efficient / math kernels itself.
- ``"math"``: the explicit ``softmax(q k^T * scale) v`` of the I-JEPA reference code; slow, used as
  the numerical reference in tests and for debugging.
- ``"xformers"``: ``xformers.ops.memory_efficient_attention``. Used only when xformers imports AND
  the tensors are on CUDA. If xformers is requested but cannot be imported, the backend resolves to
  ``"sdpa"`` with one warning (logged once per process) at model build; if it is importable but a
  forward runs on CPU tensors, that call uses ``"sdpa"`` (also warned once). Requesting it therefore
  never fails, so one config runs on every machine.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from pijepa.runtime.log import get_logger

logger = logging.getLogger(__name__)  # a child of the "pijepa" logger: its handler prints the line

AttnBackend = Literal["sdpa", "math", "xformers"]
ATTN_BACKENDS: tuple[str, ...] = get_args(AttnBackend)


@functools.cache
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, but also broken CUDA builds raising at import
        return False
    return True


@functools.cache
def _warn_once(message: str) -> None:
    # functools.cache on the message turns repeated calls into no-ops: one line per cause per process.
    get_logger()  # sets up the "pijepa" handler, so the line reads "pijepa: warning: ..."
    logger.warning(message)


def resolve_attn_backend(name: str) -> str:
    """Validate ``name`` and return the backend that will actually run (see module docstring)."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; expected one of {ATTN_BACKENDS}")
    if name == "xformers" and not xformers_available():
        _warn_once("attn_backend='xformers' requested but xformers is not importable; using 'sdpa'")
        return "sdpa"
    return name


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention, ``[B, H, N, d]`` in and out."""
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    # Softmax in at least float32: half-precision softmax is the classic source of mismatches.
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return probs.to(v.dtype) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops as xops

    # xformers wants [B, N, H, d]; the transposes are views and its output comes back contiguous
    # in [B, N, H, d], so the caller's final transpose + reshape is free.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product self-attention with scale ``1/sqrt(d)``; q, k, v and result ``[B, H, N, d]``.

    ``backend`` should already be resolved (``resolve_attn_backend``); the xformers-on-CPU case is
    still handled here because the device is only known at call time.
    """
    if backend == "sdpa":
        return sdpa_attention(q, k, v)
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "xformers":
        if q.is_cuda:
            return xformers_attention(q, k, v)
        _warn_once("attn_backend='xformers' needs CUDA tensors; running 'sdpa' for CPU inputs")
        return sdpa_attention(q, k, v)
    raise ValueError(f"unknown attn_backend {backend!r}; expected one of {ATTN_BACKENDS}")


class Attention(nn.Module):
    """I-JEPA's attention module: fused ``qkv`` projection (with bias) and output ``proj``."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = resolve_attn_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # [B, N, 3*D] -> [3, B, H, N, d]; q/k/v are views, no copies.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attn_backend={self.attn_backend!r}"


def set_attn_backend(model: nn.Module, name: str) -> str:
    """Switch every ``Attention`` module inside ``model`` to backend ``name``; returns the resolved one."""
    resolved = resolve_attn_backend(name)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attn_backend = resolved
    return resolved

