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

Grid kinds (`kind`), for the models' `pos_grid` option:
  rectified  linspace(0, base, g)                       App. C (default of every condiff model)
  arange     arange(g)                                  facebookresearch/DiT, sail-sg/MDT
  scaled     arange(g) * base / g / interp_scale        PixArt-alpha ("lewei scale"), diffusers DiT/PixArt
  sd3        (arange(g) + (max - g) // 2) * base / max / interp_scale
             diffusers SD3: a centre crop of the grid computed at `max_size` (pos_embed_max_size)
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


GRID_KINDS = ("rectified", "arange", "scaled", "sd3")


def grid_coords(grid_size: int, base_size: float | None = None, rectified: bool = True, *, kind: str | None = None,
                interp_scale: float = 1.0, max_size: int | None = None) -> Tensor:
    """1-D grid coordinates (grid_size,) float64 of a grid kind (module docstring); kind None: rectified/arange."""
    kind = kind or ("rectified" if rectified else "arange")
    base = grid_size if base_size is None else base_size
    if kind == "rectified":
        return torch.linspace(0, base, grid_size, dtype=torch.float64)
    if kind == "arange":
        return torch.arange(grid_size, dtype=torch.float64)
    if kind == "scaled":
        return torch.arange(grid_size, dtype=torch.float64) * (base / grid_size) / interp_scale
    if kind == "sd3":
        if max_size is None or grid_size > max_size:
            raise ValueError(f"grid_coords: kind 'sd3' needs max_size >= grid size {grid_size}, got {max_size}")
        top = (max_size - grid_size) // 2
        return (torch.arange(grid_size, dtype=torch.float64) + top) * (base / max_size) / interp_scale
    raise ValueError(f"grid_coords: kind must be one of {GRID_KINDS}, got {kind!r}")


def sincos_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int | None = None, base_size: float | None = None, rectified: bool = True,
    *, kind: str | None = None, interp_scale: float = 1.0, max_size: int | None = None,
) -> Tensor:
    """2D sin-cos positional embedding (grid_h * grid_w, dim) float32, row-major over (h, w).

    As in DiT/MAE the first dim/2 channels encode the w coordinate and the last dim/2 the h coordinate.
    base_size: the grid size of the resolution the model was (pre-)trained at (App. C); None = grid size.
    For a non-square grid the base is scaled per axis by grid_w / grid_h so both axes keep one step
    (kind rectified). The scaled kind spans the same base on both axes, as PixArt-alpha and diffusers
    (`get_2d_sincos_pos_embed`: arange(g) / (g / base) per axis); the sd3 kind crops both axes from the same
    max_size grid.
    kind / interp_scale / max_size: see the module docstring (kind None = rectified or arange).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    base_h = None if base_size is None else float(base_size)
    base_w = None if base_size is None else float(base_size) * grid_w / grid_h
    if kind in ("sd3", "scaled"):  # diffusers / PixArt: each axis anchored at base (convert.py parity)
        base_w = base_h
    opts = dict(kind=kind, interp_scale=interp_scale, max_size=max_size)
    hh = grid_coords(grid_h, base_h, rectified, **opts)  # (H,)
    ww = grid_coords(grid_w, base_w, rectified, **opts)  # (W,)
    gh, gw = torch.meshgrid(hh, ww, indexing="ij")  # (H, W) each
    emb_w = sincos_1d(dim // 2, gw.reshape(-1))  # (H*W, dim/2)
    emb_h = sincos_1d(dim // 2, gh.reshape(-1))  # (H*W, dim/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (H*W, dim)
