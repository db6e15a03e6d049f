"""Resolution transfer helpers: the App. C positional grid (models/posemb.py, shared with the backbones)
and the Eq. 3 schedule a checkpoint stores for a resolution change."""

import json

import pytest
import torch

from condiff.diffusion.schedule import Schedule
from condiff.models.posemb import grid_coords, sincos_1d, sincos_pos_embed_2d

BASE = 16  # e.g. 256 px, SD-VAE /8, patch 2


@pytest.mark.parametrize("grid", [4, 8, 16, 32, 64])
def test_rectified_grid_spans_zero_to_base_at_every_resolution(grid):
    coords = grid_coords(grid, BASE)
    assert coords.shape == (grid,) and coords.dtype == torch.float64
    assert coords[0] == 0.0 and coords[-1] == pytest.approx(BASE, abs=1e-12)
    steps = coords.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, BASE / (grid - 1)), rtol=1e-12, atol=1e-12)
    # DiT's arange grid extrapolates beyond the trained range instead (Fig. 4)
    if grid > BASE:
        assert grid_coords(grid, BASE, rectified=False)[-1] == grid - 1 > BASE


def test_base_size_grid_is_the_base_grid():
    dim = 64
    at_base = sincos_pos_embed_2d(dim, BASE, BASE, base_size=BASE)
    torch.testing.assert_close(at_base, sincos_pos_embed_2d(dim, BASE, BASE), rtol=0, atol=0)
    # row-major over (h, w); first dim/2 channels encode w, the last dim/2 encode h
    coords = torch.linspace(0, BASE, BASE, dtype=torch.float64)
    h, w = 3, 11
    expected = torch.cat([sincos_1d(dim // 2, coords[w:w + 1]), sincos_1d(dim // 2, coords[h:h + 1])], 1).float()
    torch.testing.assert_close(at_base[h * BASE + w], expected[0], rtol=0, atol=1e-6)


def test_higher_resolution_interpolates_inside_the_base_range():
    dim = 32
    base = sincos_pos_embed_2d(dim, BASE, BASE, base_size=BASE).view(BASE, BASE, dim)
    up = sincos_pos_embed_2d(dim, 2 * BASE, 2 * BASE, base_size=BASE).view(2 * BASE, 2 * BASE, dim)
    # the four corners sit at the same positions (0 and BASE) as at the base resolution
    for (i, j), (bi, bj) in {(0, 0): (0, 0), (0, -1): (0, -1), (-1, 0): (-1, 0), (-1, -1): (-1, -1)}.items():
        torch.testing.assert_close(up[i, j], base[bi, bj], rtol=0, atol=1e-6)


@pytest.mark.parametrize("gh,gw", [(BASE, 2 * BASE), (2 * BASE, BASE), (8, 32), (12, 20)])
def test_non_square_grids_follow_each_kinds_convention(gh, gw):
    """rectified: ONE step on both axes, that of the square grid with the same token count (base / (sqrt(gh gw)
    - 1)); scaled (PixArt / diffusers): each axis spans [0, base) on its own; arange: arange per axis."""
    dim = 32
    step = BASE / ((gh * gw) ** 0.5 - 1)
    for kind, coord_h, coord_w in (
        ("rectified", lambda h: h * step, lambda w: w * step),
        ("scaled", lambda h: h * BASE / gh, lambda w: w * BASE / gw),
        ("arange", float, float),
    ):
        emb = sincos_pos_embed_2d(dim, gh, gw, base_size=BASE, kind=kind).view(gh, gw, dim)
        for h, w in ((0, 0), (gh - 1, gw - 1), (gh // 3, gw // 2 + 1)):
            want = torch.cat([sincos_1d(dim // 2, torch.tensor([coord_w(w)], dtype=torch.float64)),
                              sincos_1d(dim // 2, torch.tensor([coord_h(h)], dtype=torch.float64))], 1).float()[0]
            torch.testing.assert_close(emb[h, w], want, rtol=0, atol=1e-6, msg=f"{kind} at ({h}, {w})")
    # the transposed grid is the transposed table (w and h feature halves swapped); square stays linspace
    emb = sincos_pos_embed_2d(dim, gh, gw, base_size=BASE).view(gh, gw, dim)
    tr = sincos_pos_embed_2d(dim, gw, gh, base_size=BASE).view(gw, gh, dim)
    torch.testing.assert_close(tr, torch.cat([emb[..., dim // 2:], emb[..., : dim // 2]], -1).transpose(0, 1),
                               rtol=0, atol=0)
    sq = torch.linspace(0, BASE, gh, dtype=torch.float64)
    assert torch.equal(sincos_pos_embed_2d(dim, gh, gh, base_size=BASE),
                       torch.cat([sincos_1d(dim // 2, sq.repeat(gh)), sincos_1d(dim // 2, sq.repeat_interleave(gh))],
                                 1).float())


def test_eq3_schedule_travels_with_the_checkpoint_dict():
    """Fine-tuning 256 -> 512 stores the rescaled schedule; sampling rebuilds exactly that schedule."""
    trained = Schedule().at_resolution(512, base_resolution=256)
    restored = Schedule.from_dict(json.loads(json.dumps(trained.to_dict())))
    assert restored == trained and torch.equal(restored.alphas_cumprod, trained.alphas_cumprod)
    torch.testing.assert_close(restored.sigmas, 2 * Schedule().sigmas, rtol=1e-12, atol=0)
