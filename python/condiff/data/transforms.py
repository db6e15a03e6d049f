"""Crop strategies, flip and image-mode normalisation, each recording the control metadata of `Cond`.

A training view of an image is: a crop box inside the decoded image with the aspect of the target
resolution (square for the usual int resolution; `(height, width)` targets give non-square boxes), resized
to the target, then optionally mirrored left-right. Its control metadata (`cond.CONTROL_H_FIELDS`,
`cond.CONTROL_L_FIELDS`) describes exactly that:

  control_h (6,) = [crop_top, crop_left, crop_height, crop_width, aspect_ratio, flip]
      crop box in ORIGINAL-image pixels (see below), aspect_ratio = crop_width / crop_height of that box
      (the real aspect of the crop: 1.0 for square crops of an image stored at its original size, so the
      field carries information only for non-square targets or resized stored images), flip = 1.0 if the
      output was mirrored.
  control_l (2,) = [orig_height, orig_width] of the original image.

Re-applying the metadata (crop rows [top, top+h) and columns [left, left+w) of the source, resize to
R x R with the same filter, mirror if flip) reproduces the output pixels exactly (tested).

Original vs decoded image: when the stored image is a resized copy of an original of known size (the
`original_width` / `original_height` fields img2dataset writes in the per-sample json with
resize_mode "keep_ratio" / "no"), the crop box is scaled per axis by original/decoded, so it is
expressed in original pixels (possibly fractional). Otherwise original == decoded.

Crop strategies (paper Sec. 4 "Pre-training cropping strategies"): the crop height is
`ratio * (largest box height of the target aspect inside the image)` (for square targets `min(H, W)`) with
`ratio ~ U[lo, hi]`: global (0.9, 1.0), local (0.4, 0.6), mix (0.4, 1.0).
"center" (ratio 1, centred, no randomness) is provided for evaluation/reference images. The box
position is uniform over all positions that keep it inside the image. The crop side is rounded to
whole decoded pixels and is at least 1. Images smaller than the target are upsampled (no padding);
use the loader's `min_size` to skip them instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CROP_RATIOS: dict[str, tuple[float, float]] = {
    "global": (0.9, 1.0),
    "local": (0.4, 0.6),
    "mix": (0.4, 1.0),
    "center": (1.0, 1.0),
}

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "box": Image.BOX}


@dataclass(frozen=True)
class CropParams:
    """A view of a decoded image: box (decoded pixels; `size` rows x `width` columns, width None = square)
    and flip."""

    top: int
    left: int
    size: int
    flip: bool
    width: int | None = None

    @property
    def box_width(self) -> int:
        return self.size if self.width is None else self.width

    def control(self, decoded_hw: tuple[int, int], orig_hw: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(control_h (6,), control_l (2,)) float32, box in original-image pixels (module docstring)."""
        dh, dw = decoded_hw
        oh, ow = (dh, dw) if orig_hw is None else orig_hw
        sy, sx = oh / dh, ow / dw
        h, w = self.size * sy, self.box_width * sx
        control_h = np.array([self.top * sy, self.left * sx, h, w, w / h, float(self.flip)], dtype=np.float32)
        control_l = np.array([oh, ow], dtype=np.float32)
        return control_h, control_l


def sample_crop(height: int, width: int, strategy: str, rng: np.random.Generator, flip_prob: float = 0.5,
                aspect: float = 1.0) -> CropParams:
    """Draw a crop of width / height `aspect` (1 = square) of a (height, width) image with a crop strategy
    (see module docstring)."""
    if strategy not in CROP_RATIOS:
        raise ValueError(f"unknown crop strategy {strategy!r}; expected one of {list(CROP_RATIOS)}")
    if not aspect > 0:
        raise ValueError(f"sample_crop: aspect must be > 0, got {aspect!r}")
    lo, hi = CROP_RATIOS[strategy]
    short = min(height, width / aspect)  # height of the largest box of this aspect inside the image
    ratio = lo if lo == hi else rng.uniform(lo, hi)
    size = max(1, min(height, int(round(ratio * short))))
    box_w = max(1, min(width, int(round(size * aspect))))
    if strategy == "center":
        top, left = (height - size) // 2, (width - box_w) // 2
    else:
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - box_w + 1))
    flip = bool(flip_prob > 0 and rng.random() < flip_prob)
    return CropParams(top=top, left=left, size=size, flip=flip, width=None if aspect == 1.0 else box_w)


def apply_crop(image: Image.Image, params: CropParams, resolution: int | tuple[int, int],
               resample: str = "bicubic") -> Image.Image:
    """Crop, resize to `resolution` (R: R x R; (H, W)) with `resample` (PIL, antialiased), mirror if flip."""
    out_h, out_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    box = (params.left, params.top, params.left + params.box_width, params.top + params.size)
    out = image.crop(box)
    if (params.size, params.box_width) != (out_h, out_w):
        out = out.resize((out_w, out_h), RESAMPLE[resample])
    if params.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (uint8 v -> v / 127.5 - 1).

    Computed in numpy (single-threaded): torch's multi-threaded elementwise ops are slow in data
    code running beside training threads on few cores (measured 20x on a loaded 2-core machine)."""
    arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
    out = np.empty(arr.shape, dtype=np.float32)
    np.multiply(arr, 1 / 127.5, out=out)
    out -= 1.0
    return torch.from_numpy(out)


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB. Returns (rgb, source mode if a conversion happened else None).

    * alpha (RGBA, LA, PA, P with transparency): composited over WHITE (web images with transparent
      backgrounds are meant to be seen on white);
    * 16-bit / 32-bit grayscale (I;16*, I, F): scaled to 8 bits (I;16 by 1/257, I and F clipped to 0..255);
    * CMYK, YCbCr, LAB, HSV, L, 1, P: PIL's conversion (CMYK without an ICC transform).
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        arr = arr / 257.0 if mode.startswith("I;16") else arr
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB"), mode
    return image.convert("RGB"), mode


class CropTransform:
    """image -> (tensor (3, H, W) in [-1, 1], control_h (6,), control_l (2,), CropParams).

    `resolution` R (square, H = W = R) or (H, W): a non-square target takes crops of aspect W / H, and
    control_h's aspect_ratio carries it.

    `rng` is a numpy Generator; the loader seeds one per (seed, epoch, sample key) so views are
    reproducible and independent of worker count.
    """

    def __init__(self, resolution: int | tuple[int, int], strategy: str = "global", flip_prob: float = 0.5,
                 resample: str = "bicubic"):
        if strategy not in CROP_RATIOS:
            raise ValueError(f"unknown crop strategy {strategy!r}; expected one of {list(CROP_RATIOS)}")
        if resample not in RESAMPLE:
            raise ValueError(f"unknown resample filter {resample!r}; expected one of {list(RESAMPLE)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        hw = (resolution, resolution) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"resolution must be a positive int or (height, width), got {resolution!r}")
        self.resolution = resolution if isinstance(resolution, int) else hw
        self.aspect = hw[1] / hw[0]
        self.strategy, self.flip_prob, self.resample = strategy, float(flip_prob), resample

    def params(self, image: Image.Image, rng: np.random.Generator) -> CropParams:
        w, h = image.size
        return sample_crop(h, w, self.strategy, rng, self.flip_prob, self.aspect)

    def __call__(self, image: Image.Image, rng: np.random.Generator, orig_hw: tuple[float, float] | None = None):
        p = self.params(image, rng)
        out = apply_crop(image, p, self.resolution, self.resample)
        control_h, control_l = p.control((image.size[1], image.size[0]), orig_hw)
        return to_tensor(out), control_h, control_l, p
