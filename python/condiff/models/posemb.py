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

Non-square grids (gh != gw) follow each kind's convention (`axis_coords`):
  rectified  both axes share ONE step: that of the square grid with the same token count, g = sqrt(gh gw),
             i.e. step = base / (g - 1) and axis k spans [0, step (g_k - 1)]. The resolution scale of an
             H x W input is thus its pixel-count scale s = sqrt(gh gw) / base (the s of the guidance law,
             `condiff.diffusion.guidance`), positions stay isotropic (a circle stays a circle in position
             space), and a transposed input gets the transposed grid. At gh == gw this is linspace(0, base, g).
  arange     arange(gh) x arange(gw) (MAE / DiT's function on a (gh, gw) grid).
  scaled     each axis spans [0, base) on its own (PixArt-alpha's PixArtMS and diffusers
             `get_2d_sincos_pos_embed(grid_size=(h, w))`: arange(g_k) / (g_k / base) / interp_scale).
  sd3        each axis is cropped around the centre of the same max_size grid (diffusers `cropped_pos_embed`).

Grid kinds (`kind`), for the models' `pos_grid` option (1-D formulas, g tokens on the axis):
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


def rectified_step(grid_h: int, grid_w: int, base_size: float) -> float:
    """Grid step of the rectified (App. C) grid of a grid_h x grid_w input: base / (sqrt(grid_h grid_w) - 1),
    the step of linspace(0, base, g) on the square grid with the same token count (module docstring)."""
    g = (grid_h * grid_w) ** 0.5  # exact for square grids
    return float(base_size) / (g - 1) if g > 1 else 0.0


def axis_coords(grid_h: int, grid_w: int, base_size: float | None = None, *, kind: str = "rectified",
                interp_scale: float = 1.0, max_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Coordinates (grid_h,), (grid_w,) float64 of both axes of a grid kind (module docstring: non-square).
    base_size None: each axis's own size (rectified non-square: sqrt(grid_h grid_w), the equal-count square)."""
    if kind != "rectified" or grid_h == grid_w:  # per-axis formulas; a square rectified grid: linspace(0, base, g)
        opts = dict(kind=kind, interp_scale=interp_scale, max_size=max_size)
        return grid_coords(grid_h, base_size, **opts), grid_coords(grid_w, base_size, **opts)
    step = rectified_step(grid_h, grid_w, (grid_h * grid_w) ** 0.5 if base_size is None else base_size)
    return (torch.arange(grid_h, dtype=torch.float64) * step,  # (H,) one step on both axes
            torch.arange(grid_w, dtype=torch.float64) * step)  # (W,)


def sincos_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int | None = None, base_size: float | None = None, rectified: bool = True,
    *, kind: str | None = None, interp_scale: float = 1.0, max_size: int | None = None,
) -> Tensor:
    """2D sin-cos positional embedding (grid_h * grid_w, dim) float32, row-major over (h, w).

    As in DiT/MAE the first dim/2 channels encode the w coordinate and the last dim/2 the h coordinate.
    base_size: the grid size of the resolution the model was (pre-)trained at (App. C); None = the grid's own
    size (per axis). Non-square grids follow the kind's convention (module docstring, `axis_coords`).
    kind / interp_scale / max_size: see the module docstring (kind None = rectified or arange).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    kind = kind or ("rectified" if rectified else "arange")
    hh, ww = axis_coords(grid_h, grid_w, base_size, kind=kind, interp_scale=interp_scale, max_size=max_size)
    gh, gw = torch.meshgrid(hh, ww, indexing="ij")  # (H, W) each
    emb_w = sincos_1d(dim // 2, gw.reshape(-1))  # (H*W, dim/2)
    emb_h = sincos_1d(dim // 2, gh.reshape(-1))  # (H*W, dim/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (H*W, dim)
