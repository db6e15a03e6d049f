"""2D sin-cos positional embeddings with the rectified grid sampling of App. C.

The paper (App. C, Pseudocode 1) replaces `grid = arange(grid_size)` by
`grid = linspace(0, base_size, grid_size)`: at any resolution the grid spans the same range
[0, base_size], only its step shrinks. A model trained at grid 16 (256 px, patch 2, SD-VAE /8) and
fine-tuned at grid 32 therefore sees positions interpolated inside the range it knows instead of
extrapolated beyond it (Fig. 4).

Reading of an ambiguity: `linspace(0, base_size, grid_size)` puts the last position at `base_size`,
so at `grid_size == base_size` the grid is NOT `arange(grid_size)` (its step is base/(base-1), not 1).
We follow the pseudocode literally; `rectified=False` gives DiT's plain `arange` grid (for loading
facebookresearch/DiT weights, whose embedding is a fixed buffer computed with arange).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos features of positions. pos (L,) float64 -> (L, dim): [sin(pos*w), cos(pos*w)], w = 1/10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, dim)


def grid_coords(grid_size: int, base_size: float | None = None, rectified: bool = True) -> Tensor:
    """1-D grid coordinates (grid_size,) float64: linspace(0, base_size, grid_size) (App. C) or arange."""
    if not rectified:
        return torch.arange(grid_size, dtype=torch.float64)
    base = grid_size if base_size is None else base_size
    return torch.linspace(0, base, grid_size, dtype=torch.float64)


def sincos_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int | None = None, base_size: float | None = None, rectified: bool = True
) -> Tensor:
    """2D sin-cos positional embedding (grid_h * grid_w, dim) float32, row-major over (h, w).

    As in DiT/MAE the first dim/2 channels encode the w coordinate and the last dim/2 the h coordinate.
    base_size: the grid size of the resolution the model was (pre-)trained at (App. C); None = grid size.
    For a non-square grid the base is scaled per axis by grid_w / grid_h so both axes keep one step.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    base_h = None if base_size is None else float(base_size)
    base_w = None if base_size is None else float(base_size) * grid_w / grid_h
    hh = grid_coords(grid_h, base_h, rectified)  # (H,)
    ww = grid_coords(grid_w, base_w, rectified)  # (W,)
    gh, gw = torch.meshgrid(hh, ww, indexing="ij")  # (H, W) each
    emb_w = sincos_1d(dim // 2, gw.reshape(-1))  # (H*W, dim/2)
    emb_h = sincos_1d(dim // 2, gh.reshape(-1))  # (H*W, dim/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (H*W, dim)
