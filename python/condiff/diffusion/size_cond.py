"""Inference-time control conditioning (paper Sec. 3.3, Table 2b).

At sampling time the control metadata of `Cond` must be chosen:
  phi_l (control_l, (B, 2) = [orig_height, orig_width]): the "original image size". Either FIXED (one
      size for every sample, e.g. the output size) or drawn from the TRAINING distribution of original
      sizes stored with the model (checkpoint meta "size_distribution", or "train_sizes" as written by
      `condiff.io.checkpoint`: a list of [h, w]), or uniform square sizes over a range (Table 2b's U([512, 1024])). Table 2b: drawing from D_train gives the best FID
      (3.04 vs 4.12 for a fixed 512).
  phi_h (control_h, (B, 6) = [crop_top, crop_left, crop_height, crop_width, aspect_ratio, flip]): a full,
      centred, un-flipped crop of that original image, i.e. the largest box with the output's aspect
      ratio centred in it, in original pixels (for square outputs exactly the data pipeline's "center"
      crop: side min(h, w), top = (h - side) // 2, left = (w - side) // 2).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SIZE_META_KEYS = ("size_distribution", "train_sizes")


def size_distribution_from_meta(meta: dict) -> list[list[float]] | None:
    """The training size distribution stored in checkpoint meta (first key of SIZE_META_KEYS found), or None."""
    for key in SIZE_META_KEYS:
        sizes = meta.get(key)
        if sizes:
            return validate_sizes(sizes, f"meta[{key!r}]")
    return None


def validate_sizes(sizes: Sequence[Sequence[float]], where: str = "size_distribution") -> list[list[float]]:
    out = []
    for i, s in enumerate(sizes):
        if len(s) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in s):
            raise ValueError(f"{where}[{i}]: expected [height, width] with positive numbers, got {s!r}")
        out.append([float(s[0]), float(s[1])])
    if not out:
        raise ValueError(f"{where}: empty list of sizes")
    return out


def draw_sizes(batch: int, size_distribution: Sequence[Sequence[float]],
               generator: torch.Generator | None = None) -> Tensor:
    """(B, 2) float32 [h, w] drawn uniformly (with replacement) from the stored list, i.e. from the
    empirical training distribution of original sizes."""
    sizes = torch.tensor(validate_sizes(size_distribution), dtype=torch.float32)  # (N, 2)
    idx = torch.randint(0, sizes.shape[0], (batch,), generator=generator,
                        device=generator.device if generator is not None else "cpu")
    return sizes[idx.cpu()]


def full_crop_control_h(orig_sizes: Tensor, out_hw: tuple[int, int] = (1, 1)) -> Tensor:
    """(B, 6) float32 phi_h of a full centred un-flipped crop with the aspect of out_hw, in original pixels.
    orig_sizes (B, 2) [h, w]."""
    h, w = orig_sizes[:, 0].double(), orig_sizes[:, 1].double()  # (B,)
    target = out_hw[1] / out_hw[0]  # width / height of the output
    crop_w = torch.minimum(w, h * target)
    crop_h = crop_w / target  # square output: crop_h = crop_w = min(h, w), the data pipeline's "center" crop
    top = torch.floor((h - crop_h) / 2)
    left = torch.floor((w - crop_w) / 2)
    flip = torch.zeros_like(h)
    return torch.stack([top, left, crop_h, crop_w, crop_w / crop_h, flip], dim=1).float()


def draw_uniform_sizes(batch: int, size_range: tuple[float, float],
                       generator: torch.Generator | None = None) -> Tensor:
    """(B, 2) float32 square original sizes [s, s], s ~ U([lo, hi]) (Table 2b's "uniform U([512, 1024])")."""
    lo, hi = (float(v) for v in size_range)
    if not 0 < lo <= hi:
        raise ValueError(f"size conditioning: uniform range needs 0 < lo <= hi, got {size_range!r}")
    side = lo + (hi - lo) * torch.rand(batch, generator=generator, device=generator.device if generator else "cpu")
    return side.cpu().float()[:, None].repeat(1, 2)


def inference_control(batch: int, out_hw: tuple[int, int], *, size: tuple[float, float] | None = None,
                      size_distribution: Sequence[Sequence[float]] | None = None,
                      size_range: tuple[float, float] | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(control_h (B, 6), control_l (B, 2)) for sampling.

    size given: fixed original size [h, w] for every sample. size_range (lo, hi): square sizes drawn from
    U([lo, hi]). Otherwise drawn from `size_distribution` (Table 2b's best). None of them: the output size
    itself (a = b = resolution, Table 2b's first row).
    """
    if size is not None:
        if len(size) != 2 or not all(v > 0 for v in size):
            raise ValueError(f"size conditioning: expected (height, width) > 0, got {size!r}")
        control_l = torch.tensor([[float(size[0]), float(size[1])]]).repeat(batch, 1)
    elif size_range is not None:
        control_l = draw_uniform_sizes(batch, size_range, generator)
    elif size_distribution is not None:
        control_l = draw_sizes(batch, size_distribution, generator)
    else:
        control_l = torch.tensor([[float(out_hw[0]), float(out_hw[1])]]).repeat(batch, 1)
    if not all(math.isfinite(v) for v in control_l.flatten().tolist()):
        raise ValueError("size conditioning: sizes must be finite")
    return full_crop_control_h(control_l, out_hw), control_l
