"""`save_grid`: the PNG grid every command writes (`condiff sample`, `condiff eval`'s grid.png, training
previews, the demo), with an optional JSON record beside it (`<name>.png.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from condiff.io.atomic import atomic_path, atomic_write_text
from condiff.io.images import to_uint8


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, *, min_cell: int = 0,
              row_captions: list[str] | None = None, record: dict[str, Any] | None = None) -> Path:
    """(N, 3, H, W) in [-1, 1] (or uint8) -> one PNG grid, `nrow` images per row (default ~sqrt(N)),
    2 px grey padding, each image nearest-upscaled by the integer factor min_cell // H when that is > 1 (tiny
    previews stay visible). `row_captions`: one caption per grid row, written left of the row on a white
    column as wide as the longest caption. Written atomically; `record` (JSON-able) goes to `<path>.json`."""
    from PIL import Image
    from torchvision.utils import make_grid

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"save_grid: expected images (N, 3, H, W), got {tuple(images.shape)}")
    images = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float().cpu()
    factor = max(1, min_cell // images.shape[-1])
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    grid = Image.fromarray(to_uint8(make_grid(images.clamp(-1, 1), nrow=nrow, padding=2, pad_value=0.0)))  # grey padding
    if row_captions is not None:
        grid = _caption_rows(grid, row_captions, n_rows=-(-images.shape[0] // nrow), cell=images.shape[-2] + 2)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG")
    if record is not None:
        atomic_write_text(path.with_name(path.name + ".json"), json.dumps(record, indent=1))
    return path


def pad_to_common(images: list[Tensor]) -> Tensor:
    """Images (3, H_i, W_i) (or batches (B, 3, H_i, W_i)) of several shapes -> (N, 3, H, W), H and W the
    largest sides, each image centred on grey (0 in [-1, 1], the grid's padding colour): a grid of mixed
    aspects keeps every sample's own pixels and shape."""
    flat = [x.reshape(-1, *x.shape[-3:]) for x in images]  # (B_i, 3, H_i, W_i)
    H, W = max(x.shape[-2] for x in flat), max(x.shape[-1] for x in flat)
    out = []
    for x in flat:
        dh, dw = H - x.shape[-2], W - x.shape[-1]
        out.append(torch.nn.functional.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=0.0))
    return torch.cat(out)  # (N, 3, H, W)


def _caption_rows(grid, captions: list[str], n_rows: int, cell: int):
    """`grid` (PIL) with a white caption column on its left, caption r centred on row r (rows `cell` px apart)."""
    from PIL import Image, ImageDraw

    if len(captions) != n_rows:
        raise ValueError(f"save_grid: {len(captions)} row captions for a grid of {n_rows} rows")
    font = ImageDraw.Draw(grid).font
    label_w = 12 + max(int(ImageDraw.Draw(grid).textlength(c, font=font)) for c in captions)
    out = Image.new("RGB", (label_w + grid.width, grid.height), (255, 255, 255))
    out.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(out)
    for r, caption in enumerate(captions):
        draw.text((6, 2 + r * cell + cell // 2 - 6), caption, fill=(0, 0, 0))
    return out
