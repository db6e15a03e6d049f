"""Content-change score (paper Tab. 2a at toy scale): how much of an image's content moves when only its size
conditioning changes. Offline stand-in for the paper's LPIPS over size sweeps (`condiff.eval.lpips_size`),
which needs ImageNet weights; read on shapes images, whose content the analytic detector
(`condiff.eval.align.detect`) recovers exactly.

Inputs: two sets of images generated from the SAME seeds and prompts under two size conditions,
`images_a[i]` paired with `images_b[i]`, each (N, 3, H, W), N >= 1, the same shape; a torch tensor or a
numpy array, either uint8 in [0, 255] or floating point in `value_range` ((-1, 1) by default, the samplers'
output; (0, 1) when asked). Anything else (other dtypes or layouts, values outside the range, NaN, shape
mismatch) raises ValueError naming the argument.

Per pair (a, b), both quantised to uint8 like a saved PNG (`condiff.io.images.to_uint8`):
  * object change O in [0, 1]: detect the objects of a and of b; match them one-to-one, same colour only,
    minimising the total centroid distance (Hungarian); every object of the union (matched pairs count
    once) costs 1 if unmatched (it appears or vanishes, or changed colour), else
        min(1, dist / DISPLACEMENT_SCALE + SHAPE_COST [shapes differ]),
    dist = centroid distance in units of the image side (DISPLACEMENT_SCALE = 0.5: moving across half the
    image is a full change); O = mean over the union (0 when neither image holds an object). A mirrored
    left/right pair of two colours scores 1.
  * low-pass pixel distance P in [0, 1]: mean |G * a - G * b| over pixels and channels, on [0, 1] values,
    G a Gaussian of standard deviation BLUR_FRACTION x the image side (2 px at 32 px): blind to pixel
    noise and sub-pixel shifts, not to moved or recoloured objects.
  * score S = (O + min(1, P / PIXEL_SCALE)) / 2 in [0, 1]; 0 for identical images.
The set's score is the mean of S over the N pairs (components likewise: O, P, the fraction of unmatched
objects, the mean displacement and shape change of matched objects).

Size sweeps (`sweep_change`): K images per sample (one per size conditioning), each scored against the
image at the reference size, averaged over the K - 1 pairs, then over samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from condiff.eval.align import Detection, detect
from condiff.io.images import to_uint8

DISPLACEMENT_SCALE = 0.5
SHAPE_COST = 0.5
BLUR_FRACTION = 1 / 16
PIXEL_SCALE = 0.1
COMPONENTS = ("score", "object_change", "pixel_lowpass", "unmatched", "displacement", "shape_change")


def as_uint8(images: Tensor | np.ndarray, name: str, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, 3, H, W) uint8 or float in `value_range` -> (N, H, W, 3) uint8; ValueError naming `name` otherwise."""
    if not isinstance(images, (Tensor, np.ndarray)):
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(images).__name__}")
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected (N >= 1, 3, H, W) images, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return to_uint8(x)
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or floating point images, got {x.dtype}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range: expected (low, high) with high > low, got {value_range}")
    x = x.detach().float().cpu()
    if torch.isnan(x).any():
        raise ValueError(f"{name}: images contain NaN")
    tol = 1e-3 * (hi - lo)
    if x.min() < lo - tol or x.max() > hi + tol:
        raise ValueError(f"{name}: values in [{float(x.min()):.3g}, {float(x.max()):.3g}] lie outside value_range "
                         f"({lo:g}, {hi:g}); pass value_range=(0, 1) for images in [0, 1], or uint8 images")
    return to_uint8((x - lo) / (hi - lo) * 2.0 - 1.0)


def match_objects(a: list[Detection], b: list[Detection]) -> list[tuple[int, int, float]]:
    """One-to-one matches (i, j, centroid distance) between same-colour detections, minimum total distance."""
    from scipy.optimize import linear_sum_assignment

    if not a or not b:
        return []
    big = 1e6
    cost = np.full((len(a), len(b)), big)  # (n_a, n_b)
    for i, da in enumerate(a):
        for j, db in enumerate(b):
            if da.colour == db.colour:
                cost[i, j] = float(np.hypot(da.x - db.x, da.y - db.y))
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j), float(cost[i, j])) for i, j in zip(rows, cols) if cost[i, j] < big]


def object_change(a: list[Detection], b: list[Detection]) -> dict[str, float]:
    """O (module docstring) of two detection lists, with its parts: `unmatched` (fraction of the union),
    `displacement` and `shape_change` (summed over matched pairs; `matched` their count)."""
    matches = match_objects(a, b)
    union = len(a) + len(b) - len(matches)
    if union == 0:
        return {"object_change": 0.0, "unmatched": 0.0, "displacement": 0.0, "shape_change": 0.0, "matched": 0}
    costs = [min(1.0, d / DISPLACEMENT_SCALE + SHAPE_COST * (a[i].shape != b[j].shape)) for i, j, d in matches]
    unmatched = union - len(matches)
    return {"object_change": (sum(costs) + unmatched) / union, "unmatched": unmatched / union,
            "displacement": sum(d for _, _, d in matches),
            "shape_change": float(sum(a[i].shape != b[j].shape for i, j, _ in matches)), "matched": len(matches)}


def lowpass_distance(a: np.ndarray, b: np.ndarray) -> float:
    """P (module docstring) of two (H, W, 3) uint8 images."""
    from scipy.ndimage import gaussian_filter

    sigma = BLUR_FRACTION * min(a.shape[:2])
    blur = [gaussian_filter(x.astype(np.float64) / 255.0, sigma=(sigma, sigma, 0), mode="reflect") for x in (a, b)]
    return float(np.abs(blur[0] - blur[1]).mean())


def pair_change(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Score and components of one pair of (H, W, 3) uint8 images (module docstring)."""
    obj = object_change(detect(a), detect(b))
    pix = lowpass_distance(a, b)
    return {"score": 0.5 * (obj["object_change"] + min(1.0, pix / PIXEL_SCALE)), "pixel_lowpass": pix, **obj}


def aggregate(pairs: list[dict[str, float]]) -> dict[str, float]:
    """Means over pairs: score, object_change, pixel_lowpass, unmatched; displacement and shape_change per
    matched object (nan when nothing matched); `n` pairs."""
    if not pairs:
        raise ValueError("content change: no image pairs")
    out = {k: float(np.mean([p[k] for p in pairs])) for k in ("score", "object_change", "pixel_lowpass", "unmatched")}
    matched = sum(p["matched"] for p in pairs)
    for k in ("displacement", "shape_change"):
        out[k] = sum(p[k] for p in pairs) / matched if matched else float("nan")
    out["n"] = float(len(pairs))
    return out


def content_change(images_a: Tensor | np.ndarray, images_b: Tensor | np.ndarray,
                   value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, float]:
    """Content change between paired image sets (module docstring): {"score", "object_change",
    "pixel_lowpass", "unmatched", "displacement", "shape_change", "n"}."""
    a, b = as_uint8(images_a, "images_a", value_range), as_uint8(images_b, "images_b", value_range)
    if a.shape != b.shape:
        raise ValueError(f"content change: images_a {tuple(a.shape)} and images_b {tuple(b.shape)} (N, H, W, 3) "
                         "differ; pair images of the same seed, prompt and output size")
    return aggregate([pair_change(x, y) for x, y in zip(a, b)])


def sweep_pairs(sweep: np.ndarray, ref: int = 0) -> list[dict[str, float]]:
    """The K - 1 pairs of one (K, H, W, 3) uint8 size sweep against its image `ref`."""
    return [pair_change(sweep[ref], sweep[k]) for k in range(len(sweep)) if k != ref]


def sweep_change(sweeps: Tensor | np.ndarray, ref: int = 0,
                 value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, float]:
    """Content change over size sweeps (N, K, 3, H, W): every image against image `ref` of its sweep, all
    N (K - 1) pairs aggregated like `content_change`."""
    x = torch.as_tensor(sweeps)
    if x.dim() != 5 or x.shape[1] < 2:
        raise ValueError(f"sweeps: expected (N, K >= 2, 3, H, W) size sweeps, got shape {tuple(x.shape)}")
    if not 0 <= ref < x.shape[1]:
        raise ValueError(f"ref: expected an index into the K = {x.shape[1]} sizes, got {ref}")
    u8 = as_uint8(x.flatten(0, 1), "sweeps", value_range).reshape(*x.shape[:2], *x.shape[3:], 3)
    return aggregate([p for sweep in u8 for p in sweep_pairs(sweep, ref)])
