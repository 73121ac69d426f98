"""Fixed 2-D sine-cosine positional embeddings (I-JEPA / MAE formula) and their resizing.

Layout of one embedding of width D, for the patch at row ``i`` and column ``j``:

    [ sin(j * omega), cos(j * omega), sin(i * omega), cos(i * omega) ]     each block D/4 wide
    omega[k] = 1 / 10000 ** (k / (D/4)),  k = 0 .. D/4 - 1

The column (x) coordinate fills the first half of the channels and the row (y) coordinate the
second half; this is what the official code produces (it builds the grid with ``np.meshgrid(w, h)``
and encodes ``grid[0]`` first), so embeddings built here equal the ones stored in official
checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GridSize = tuple[int, int]


def to_grid(size: int | tuple[int, int] | list[int]) -> GridSize:
    """Normalise an int (square) or a pair into an ``(h, w)`` tuple of ints."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[P] -> [P, embed_dim]``: ``concat(sin(pos * omega), cos(pos * omega))``.

    ``positions`` may be fractional; computed in float64 so that large grids stay exact.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos embedding needs an even width, got {embed_dim}")
    half = embed_dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=positions.device) / half
    omega = 1.0 / 10000.0**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed_at(
    embed_dim: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Embeddings at arbitrary (possibly fractional) ``rows``/``cols`` (same shape, any rank).

    Returns float64 ``[rows.numel(), embed_dim]``. Exposed separately so tests and resizing code
    can evaluate the continuous formula between grid points.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))
    return torch.cat([emb_cols, emb_rows], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_hw: int | tuple[int, int]) -> torch.Tensor:
    """float32 ``[h * w, embed_dim]`` for an ``h x w`` patch grid, rows in row-major patch order.

    Always computed on the CPU (even under a ``torch.device("meta")`` context) because the
    caller copies it into a parameter; copying into a meta parameter is a no-op.
    """
    h, w = to_grid(grid_hw)
    rows = torch.arange(h, dtype=torch.float64, device="cpu")
    cols = torch.arange(w, dtype=torch.float64, device="cpu")
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return get_2d_sincos_pos_embed_at(embed_dim, grid_rows, grid_cols).to(torch.float32)


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    src_hw: int | tuple[int, int],
    dst_hw: int | tuple[int, int],
) -> torch.Tensor:
    """Resize ``[1, src_h * src_w, D]`` to ``[1, dst_h * dst_w, D]`` by bicubic interpolation.

    Resizes to the exact target grid (not by a scale factor, which rounds and can miss the target
    by one patch for non-square or odd-sized grids). Returns the input itself when the grids match,
    so the usual path costs nothing and keeps the autograd graph trivial. Interpolation runs in
    float32 because bicubic kernels are missing or inaccurate for half types on some devices.
    """
    src_h, src_w = to_grid(src_hw)
    dst_h, dst_w = to_grid(dst_hw)
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != src_h * src_w:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not match a [1, {src_h}*{src_w}, D] grid"
        )
    if (src_h, src_w) == (dst_h, dst_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, src_h, src_w, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst_h, dst_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_h * dst_w, dim).to(pos_embed.dtype)
