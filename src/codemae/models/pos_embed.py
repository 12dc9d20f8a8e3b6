"""2-D sin-cos position embeddings and their resizing to other grid sizes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos embedding of a ``grid x grid`` token grid, shape (grid*grid, dim).

    Half the channels encode the row, half the column (as in MAE).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_pos_embed(pos: Tensor, num_tokens: int) -> Tensor:
    """Bicubically resize a (1, N, D) square-grid embedding to ``num_tokens`` tokens."""
    n = pos.shape[1]
    if n == num_tokens:
        return pos
    old, new = math.isqrt(n), math.isqrt(num_tokens)
    if old * old != n or new * new != num_tokens:
        raise ValueError(f"cannot resize a position embedding of {n} tokens to {num_tokens}: not square grids")
    grid = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, num_tokens, -1)


def published_resize(pos: Tensor, grid: int) -> Tensor:
    """The published models' resampling of a (1, N, D) square-grid table to ``grid x grid``: bicubic
    with ``scale_factor = (grid + 0.1) / sqrt(N)``, the factor also used to map coordinates, so the
    table changes (by up to ~0.1 on a sin-cos table) even when the size stays the same."""
    old = math.isqrt(pos.shape[1])
    table = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / old
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if table.shape[-2:] != (grid, grid):
        raise ValueError(f"published position resampling gave {tuple(table.shape[-2:])}, not {grid}x{grid}")
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
