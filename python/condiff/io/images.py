"""The image-extension table and the float -> uint8 quantisation every writer and metric uses."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# extensions (without the dot) read as images: webdataset sample fields and image-folder files
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def to_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) float in [-1, 1] (or uint8) -> (B, H, W, 3) or (H, W, 3) uint8 numpy,
    rounding to nearest (the PNG quantisation: round((x + 1) * 127.5) clamped to [0, 255])."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images: expected (B, 3, H, W) or (3, H, W) in [-1, 1] or uint8, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.cpu().movedim(-3, -1).contiguous().numpy()
