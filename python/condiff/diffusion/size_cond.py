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
      crop: side min(h, w), top = (h - side) // 2, left = (w - side) // 2). Its aspect_ratio is the
      output's width / height, so a requested H x W sets the aspect condition.

Per-bucket training sizes (multi-aspect training, Table 2b given the output aspect). The stored training
size distribution is either ONE list of [h, w] original sizes, or a per-bucket dict
    {"<H>x<W>": [[h, w], ...], ...}
keyed by the bucket's output size in pixels (integers, e.g. "256x256", "192x320"), each value the original
sizes [h, w] of the images trained in that bucket. The dict may sit under any key of SIZE_META_KEYS
("size_distribution", "train_sizes" or "train_sizes_by_bucket"; a dict is preferred over a list when both
are stored). `sizes_for_output(dist, out_hw)` draws from the bucket whose aspect is nearest the output's
(distance |log(W/H) - log(W_b/H_b)|; ties: the pixel count nearest the output's, then the key order).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SIZE_META_KEYS = ("size_distribution", "train_sizes", "train_sizes_by_bucket")

SizeDistribution = list[list[float]] | dict[str, list[list[float]]]  # one list, or per bucket "HxW" -> list


def size_distribution_from_meta(meta: dict) -> SizeDistribution | None:
    """The training size distribution stored in checkpoint meta (module docstring): the first per-bucket dict
    found under SIZE_META_KEYS, else the first non-empty list, else None. Validated."""
    stored = [(key, meta.get(key)) for key in SIZE_META_KEYS if meta.get(key)]
    for key, value in stored:
        if isinstance(value, dict):
            return validate_buckets(value, f"meta[{key!r}]")
    for key, value in stored:
        return validate_sizes(value, f"meta[{key!r}]")
    return None


def parse_bucket_key(key: str, where: str = "size_distribution") -> tuple[int, int]:
    """"HxW" (a bucket's output size in pixels) -> (H, W)."""
    h, sep, w = str(key).partition("x")
    if sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0:
        return int(h), int(w)
    raise ValueError(f"{where}: bucket key {key!r} must be 'HxW' with positive integers, e.g. '256x256'")


def validate_buckets(buckets: dict, where: str = "size_distribution") -> dict[str, list[list[float]]]:
    """A per-bucket distribution {"HxW": [[h, w], ...]} with every key and list checked (module docstring)."""
    if not buckets:
        raise ValueError(f"{where}: empty per-bucket size distribution")
    out = {}
    for key, sizes in buckets.items():
        parse_bucket_key(key, where)
        out[str(key)] = validate_sizes(sizes, f"{where}[{key!r}]")
    return out


def nearest_bucket(buckets: dict, out_hw: tuple[int, int]) -> str:
    """The key of the bucket whose aspect W_b / H_b is nearest the output's W / H in log ratio (ties: the
    nearest pixel count, then the first key)."""
    h, w = out_hw
    aspect, pixels = math.log(w / h), h * w

    def distance(key: str) -> tuple[float, int]:
        bh, bw = parse_bucket_key(key)
        return abs(math.log(bw / bh) - aspect), abs(bh * bw - pixels)

    return min(buckets, key=distance)


def sizes_for_output(dist: SizeDistribution, out_hw: tuple[int, int]) -> tuple[list[list[float]], str | None]:
    """(the list of [h, w] to draw from for an out_hw output, the bucket key it came from or None): a
    per-bucket distribution gives its nearest-aspect bucket's list; a single list is used as is."""
    if isinstance(dist, dict):
        key = nearest_bucket(dist, out_hw)
        return dist[key], key
    return dist, None


def validate_sizes(sizes: Sequence[Sequence[float]], where: str = "size_distribution") -> list[list[float]]:
    """A list of [h, w] original sizes (positive numbers) as floats."""
    if isinstance(sizes, (str, dict)) or not isinstance(sizes, Sequence):
        raise ValueError(f"{where}: expected a list of [height, width], got {type(sizes).__name__}")
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
                      size_distribution: SizeDistribution | None = None,
                      size_range: tuple[float, float] | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(control_h (B, 6), control_l (B, 2)) for sampling.

    size given: fixed original size [h, w] for every sample. size_range (lo, hi): square sizes drawn from
    U([lo, hi]). Otherwise drawn from `size_distribution` (Table 2b's best; per bucket: the bucket nearest the
    output's aspect, `sizes_for_output`). None of them: the output size itself (Table 2b's first row).
    out_hw: the output (H, W) in pixels; phi_h is a full centred crop with its aspect W / H.
    """
    if size is not None:
        if len(size) != 2 or not all(v > 0 for v in size):
            raise ValueError(f"size conditioning: expected (height, width) > 0, got {size!r}")
        control_l = torch.tensor([[float(size[0]), float(size[1])]]).repeat(batch, 1)
    elif size_range is not None:
        control_l = draw_uniform_sizes(batch, size_range, generator)
    elif size_distribution is not None:
        control_l = draw_sizes(batch, sizes_for_output(size_distribution, out_hw)[0], generator)
    else:
        control_l = torch.tensor([[float(out_hw[0]), float(out_hw[1])]]).repeat(batch, 1)
    if not all(math.isfinite(v) for v in control_l.flatten().tolist()):
        raise ValueError("size conditioning: sizes must be finite")
    return full_crop_control_h(control_l, out_hw), control_l
