"""`align`: an analytic (weight-free) detector that reads a `shapes` image and scores it against its
caption: colour, shape, spatial relation, object count, overall. Our offline stand-in for CLIP score;
it shows whether flip conditioning keeps left and right straight.

The vocabulary (colours with their RGB, shapes, relations) and the caption grammar are DATA's:
`condiff.data.shapes.COLOURS`, `.SHAPES`, `.parse_caption` (no constant is repeated here).

Detector (per image, (H, W, 3) uint8):
  1. foreground = pixels with max channel >= `value_min` and HSV saturation >= `sat_min` (shapes
     backgrounds are dark and desaturated: every channel <= `shapes.BACKGROUND_MAX_VALUE`);
  2. each foreground pixel takes the vocabulary colour nearest in chromaticity (RGB / max channel);
  3. connected components (8-connectivity) per colour, holes filled (the shapes have none; noisy
     generated pixels make some); components smaller than `min_area_frac` of the image or than
     `rel_area` x the largest are noise;
  4. shape from two scale-free region properties: solidity (area / convex-hull area) separates the star
     (ideal 0.56) from the convex shapes; extent (area / bounding-box area) then separates the square
     (1.0), the circle (pi/4 = 0.785) and the triangle (0.5).

Scoring a caption (parsed into canonical objects: left-to-right or top-to-bottom):
  * caption objects are matched one-to-one to detections maximising sum(2 [colour ok] + [shape ok])
    (ties: larger detections first); the relation plays no part in the matching;
  * `colour`, `shape`: fraction of caption objects whose match has the caption's colour / shape;
  * `relation`: over two-object captions, both objects found with their colour AND in the captioned
    order along the layout axis (x for left/right, y for above/below; two identical objects are in
    order either way); `relation_given_found`: the order alone, over captions whose two colours were
    both found (chance = 0.5);
  * `count`: number of detections == number of caption objects;
  * `overall`: every object right in colour and shape, relation right (if any), count right.
`oracle_scores` applies the same scoring to the true caption's objects instead of detections: the
accuracy a perfect detector gets, e.g. the chance level of shuffled captions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from condiff.data import shapes

METRICS = ("colour", "shape", "relation", "relation_given_found", "count", "overall")


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    x: float  # centroid, fraction of the image width (0 = left edge)
    y: float  # centroid, fraction of the image height (0 = top edge)
    area: float  # fraction of the image area


@dataclass(frozen=True)
class DetectorConfig:
    value_min: int = 120  # foreground: brightest channel (background <= shapes.BACKGROUND_MAX_VALUE)
    sat_min: float = 0.45  # foreground: (max - min) / max
    min_area_frac: float = 0.002  # a component below this fraction of the image is noise ...
    min_pixels: int = 3  # ... and so is one below this many pixels
    rel_area: float = 0.12  # ... and one below this fraction of the largest component
    max_objects: int = 4  # keep the largest components
    star_solidity: float = 0.83  # solidity below this -> star
    square_extent: float = 0.89  # extent above this -> square
    triangle_extent: float = 0.685  # extent below this -> triangle, else circle


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(shapes.COLOURS)
    rgb = np.array([shapes.COLOURS[n] for n in names], dtype=np.float32)
    return names, rgb / rgb.max(axis=1, keepdims=True)  # (K, 3) chromaticity


def classify_shape(region, cfg: DetectorConfig) -> str:
    """Shape name from a skimage region (solidity, extent); see the module docstring."""
    if region.solidity < cfg.star_solidity:
        return "star"
    if region.extent > cfg.square_extent:
        return "square"
    return "triangle" if region.extent < cfg.triangle_extent else "circle"


def detect(image: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """Objects in one (H, W, 3) uint8 image, largest first."""
    from scipy.ndimage import binary_fill_holes  # scipy comes with scikit-image
    from skimage.measure import label, regionprops

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w, _ = image.shape
    px = image.astype(np.float32)
    vmax, vmin = px.max(axis=2), px.min(axis=2)
    fg = (vmax >= cfg.value_min) & ((vmax - vmin) >= cfg.sat_min * np.maximum(vmax, 1.0))
    names, chroma = _palette()
    chrom = px / np.maximum(vmax, 1.0)[..., None]  # (H, W, 3)
    nearest = ((chrom[:, :, None, :] - chroma[None, None]) ** 2).sum(-1).argmin(-1)  # (H, W)
    regions = []
    for k, name in enumerate(names):
        mask = fg & (nearest == k)
        if mask.any():  # the shapes have no holes: filling them undoes pixel noise inside an object
            regions += [(name, r) for r in regionprops(label(binary_fill_holes(mask), connectivity=2))]
    min_px = max(cfg.min_pixels, cfg.min_area_frac * h * w)
    regions = [(n, r) for n, r in regions if r.area >= min_px]
    if not regions:
        return []
    largest = max(r.area for _, r in regions)
    regions = sorted([(n, r) for n, r in regions if r.area >= cfg.rel_area * largest], key=lambda nr: -nr[1].area)
    out = []
    for name, r in regions[:cfg.max_objects]:
        cy, cx = r.centroid
        out.append(Detection(name, classify_shape(r, cfg), (cx + 0.5) / w, (cy + 0.5) / h, r.area / (h * w)))
    return out


def _entry_objects(entry: tuple) -> tuple[str, list[tuple[str, str]]]:
    return entry[0], list(entry[1:])


def score_detections(dets: list[Detection], caption: str) -> dict[str, float | None]:
    """Per-sample flags (1.0 / 0.0, None where not applicable) for one caption; see module docstring."""
    layout, objs = _entry_objects(shapes.parse_caption(caption))
    best, best_key = None, None
    for perm in itertools.permutations(range(len(dets)), min(len(objs), len(dets))):
        key = (sum(2 * (dets[j].colour == c) + (dets[j].shape == s) for (c, s), j in zip(objs, perm)),
               -sum(perm))  # ties: lower indices = larger detections
        if best_key is None or key > best_key:
            best, best_key = perm, key
    matched = [dets[j] for j in best] if best is not None else []
    matched += [None] * (len(objs) - len(matched))
    colour_ok = [d is not None and d.colour == c for d, (c, _) in zip(matched, objs)]
    shape_ok = [d is not None and d.shape == s for d, (_, s) in zip(matched, objs)]
    out: dict[str, float | None] = {
        "colour": float(np.mean(colour_ok)),
        "shape": float(np.mean(shape_ok)),
        "count": float(len(dets) == len(objs)),
        "relation": None,
        "relation_given_found": None,
    }
    relation_ok = True
    if layout != "single":
        found = all(colour_ok)
        if found:
            a, b = matched
            ordered = (a.x < b.x) if layout == "horizontal" else (a.y < b.y)
            ordered = ordered or objs[0] == objs[1]  # two identical objects: either order is right
            out["relation_given_found"] = float(ordered)
        relation_ok = found and bool(out["relation_given_found"])
        out["relation"] = float(relation_ok)
    out["overall"] = float(all(colour_ok) and all(shape_ok) and relation_ok and out["count"] == 1.0)
    return out


def oracle_detections(caption: str) -> list[Detection]:
    """What a perfect detector reports for an image whose true caption is `caption`."""
    layout, objs = _entry_objects(shapes.parse_caption(caption))
    pos = [(0.5, 0.5)] if layout == "single" else ([(0.25, 0.5), (0.75, 0.5)] if layout == "horizontal"
                                                    else [(0.5, 0.25), (0.5, 0.75)])
    return [Detection(c, s, x, y, 0.1) for (c, s), (x, y) in zip(objs, pos)]


def aggregate(per_sample: list[dict[str, float | None]]) -> dict[str, float]:
    """Mean of each flag over the samples where it applies; `n` samples, `n_relation` with a relation."""
    out: dict[str, float] = {}
    for m in METRICS:
        vals = [s[m] for s in per_sample if s[m] is not None]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    out["n"] = float(len(per_sample))
    out["n_relation"] = float(sum(s["relation"] is not None for s in per_sample))
    return out


def _to_hwc_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W) in [-1, 1] or uint8, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.cpu().permute(0, 2, 3, 1).numpy()


def score_samples(images: Tensor | np.ndarray, captions: list[str],
                  cfg: DetectorConfig = DetectorConfig()) -> list[dict[str, float | None]]:
    """Per-sample flags for (B, 3, H, W) images ([-1, 1] float or uint8) and their B captions."""
    u8 = _to_hwc_uint8(images)
    if len(captions) != len(u8):
        raise ValueError(f"score_images: {len(u8)} images but {len(captions)} captions")
    return [score_detections(detect(img, cfg), cap) for img, cap in zip(u8, captions)]


def score_images(images: Tensor | np.ndarray, captions: list[str],
                 cfg: DetectorConfig = DetectorConfig()) -> dict[str, float]:
    """Alignment accuracies of generated shapes images against their captions:
    {"colour", "shape", "relation", "relation_given_found", "count", "overall", "n", "n_relation"}.
    `images` (B, 3, H, W) float in [-1, 1] or uint8; `captions` in the shapes grammar."""
    return aggregate(score_samples(images, captions, cfg))


def oracle_scores(true_captions: list[str], captions: list[str]) -> dict[str, float]:
    """Accuracies a perfect detector would get scoring images of `true_captions` against `captions`."""
    return aggregate([score_detections(oracle_detections(t), c) for t, c in zip(true_captions, captions)])


def validate(preset: str = "default", resolution: int | None = 64, n: int = 400, seed: int = 0,
             cfg: DetectorConfig = DetectorConfig()) -> dict[str, dict[str, float]]:
    """The detector on the shapes dataset's own images (ADM centre crop to `resolution`; None = originals):
    {"ground_truth", "shuffled" (each image against another image's caption), "oracle" (a perfect
    detector on the same shuffled pairs: the chance level), "mirrored" (horizontally flipped images
    with their left/right captions: relation should collapse)}."""
    from condiff.eval.fid import center_crop_arr

    imgs, caps = [], []
    for i in range(n):
        s = shapes.render(i, preset, seed=seed)
        imgs.append(np.asarray(s.image) if resolution is None else center_crop_arr(s.image, resolution))
        caps.append(s.caption)
    shuffled = [caps[j] for j in np.random.default_rng(seed).permutation(n)]
    horizontal = [j for j, c in enumerate(caps) if shapes.parse_caption(c)[0] == "horizontal"]

    def run(images, captions):
        return aggregate([score_detections(detect(np.ascontiguousarray(im), cfg), c) for im, c in zip(images, captions)])

    return {"ground_truth": run(imgs, caps), "shuffled": run(imgs, shuffled), "oracle": oracle_scores(caps, shuffled),
            "mirrored": run([imgs[j][:, ::-1] for j in horizontal], [caps[j] for j in horizontal])}


def main(argv: list[str] | None = None) -> int:
    """`python -m condiff.eval.align [--preset P] [--resolution R|0] [--n N] [--seed S]`: one Markdown row
    of `validate` (colour / shape / relation / overall per column; mirrored = relation_given_found)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m condiff.eval.align", description=validate.__doc__)
    p.add_argument("--preset", default="default")
    p.add_argument("--resolution", type=int, default=64, help="0: the original sizes")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = validate(a.preset, a.resolution or None, a.n, a.seed)
    cell = lambda d: "/".join(f"{d[k]:.3f}" for k in ("colour", "shape", "relation", "overall"))  # noqa: E731
    print("| preset | resolution | ground truth | shuffled | oracle (chance) | mirrored |\n|---|---|---|---|---|---|")
    print(f"| {a.preset} | {a.resolution or 'original'} | {cell(r['ground_truth'])} | {cell(r['shuffled'])} | "
          f"{cell(r['oracle'])} | {r['mirrored']['relation_given_found']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
