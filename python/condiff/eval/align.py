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
  4. shape by template matching against the dataset's own rasteriser (`shapes._draw`, supersampled and
     box-filtered to the pixel grid, so no shape geometry is repeated here): the object's soft coverage
     (projection of (pixel - background) on (its colour - background), clipped to [0, 1]; its colour =
     the median of its component, the background = the median of the dark pixels) in its box plus a
     margin gives a colour mass and a centroid; for every shape, the template of the diameter that
     explains that mass, centred on that centroid, is compared with the coverage (sum of squared
     differences); the closest wins. Scale-free and robust to blur and pixel noise down to objects of
     5 px (16 px images), where region statistics (extent, solidity) no longer separate the shapes.

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

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from condiff.data import shapes
from condiff.io.images import to_uint8

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
    background_max: int = 110  # background estimate: median of the pixels whose brightest channel is below
    min_area_frac: float = 0.002  # a component below this fraction of the image is noise ...
    min_pixels: int = 3  # ... and so is one below this many pixels
    rel_area: float = 0.12  # ... and one below this fraction of the largest component
    max_objects: int = 4  # keep the largest components
    margin: int = 2  # pixels around a component's box in which its colour mass is read
    supersample: int = 8  # template rasterisation factor (then box-filtered to the pixel grid)


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(shapes.COLOURS)
    rgb = np.array([shapes.COLOURS[n] for n in names], dtype=np.float32)
    return names, rgb / rgb.max(axis=1, keepdims=True)  # (K, 3) chromaticity


def _draw(shape: str, cx: float, cy: float, d: float, h: int, w: int, ss: int) -> np.ndarray:
    """(h, w) float32 coverage in [0, 1] of `shape` (diameter d px, drawing centre (cx, cy) px) as the
    shapes dataset draws it (its own rasteriser), supersampled `ss` x and box-filtered."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (w * ss, h * ss), 0)
    shapes._draw(ImageDraw.Draw(im), shape, cx * ss, cy * ss, d * ss, 255)
    return np.asarray(im.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def _shape_geometry(shape: str) -> tuple[float, float]:
    """(area / d^2, centroid row offset below the drawing centre / d) of the dataset's `shape`, measured
    once on a large rasterisation (circle pi/4, square 1, triangle 1/2 and +1/6, star about 0.33)."""
    big = 512
    cov = _draw(shape, big, big, big, 2 * big, 2 * big, 1)
    rows = np.arange(2 * big, dtype=np.float64)[:, None] + 0.5
    return float(cov.sum() / big**2), float(((cov * rows).sum() / cov.sum() - big) / big)


def classify_shape(image: np.ndarray, colour_ok: np.ndarray, region, background: np.ndarray,
                   cfg: DetectorConfig = DetectorConfig()) -> str:
    """Shape of one object by template matching (module docstring, step 4). `colour_ok` (H, W) bool: pixels
    that may belong to this object (its colour, or no colour); `region`: its skimage component."""
    h, w, _ = image.shape
    bbox = region.bbox
    y0, x0 = max(0, bbox[0] - cfg.margin), max(0, bbox[1] - cfg.margin)
    y1, x1 = min(h, bbox[2] + cfg.margin), min(w, bbox[3] + cfg.margin)
    # the object's own colour (median of its component), not the vocabulary's: generated colours drift
    c = np.median(image[region.coords[:, 0], region.coords[:, 1]].astype(np.float32), axis=0) - background
    sub = image[y0:y1, x0:x1].astype(np.float32) - background  # (h', w', 3)
    cover = np.clip(sub @ c / max(float(c @ c), 1.0), 0.0, 1.0) * colour_ok[y0:y1, x0:x1]  # (h', w') coverage
    mass = float(cover.sum())
    if mass <= 0:
        return "unknown"
    yy, xx = np.mgrid[y0:y1, x0:x1]
    cy, cx = (cover * (yy + 0.5)).sum() / mass, (cover * (xx + 0.5)).sum() / mass
    best, best_err = "unknown", np.inf
    for shape in shapes.SHAPES:
        area, drop = _shape_geometry(shape)
        d = (mass / area) ** 0.5  # the diameter that explains the colour mass
        template = _draw(shape, cx - x0, cy - y0 - drop * d, d, y1 - y0, x1 - x0, cfg.supersample)
        err = float(((cover - template) ** 2).sum())
        if err < best_err:
            best, best_err = shape, err
    return best


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
    dark = vmax < cfg.background_max
    background = np.median(px[dark], axis=0) if dark.any() else np.zeros(3, np.float32)  # (3,)
    names, chroma = _palette()
    chrom = px / np.maximum(vmax, 1.0)[..., None]  # (H, W, 3)
    nearest = ((chrom[:, :, None, :] - chroma[None, None]) ** 2).sum(-1).argmin(-1)  # (H, W)
    regions = []
    for k, name in enumerate(names):
        mask = fg & (nearest == k)
        if mask.any():  # the shapes have no holes: filling them undoes pixel noise inside an object
            regions += [(k, r) for r in regionprops(label(binary_fill_holes(mask), connectivity=2))]
    min_px = max(cfg.min_pixels, cfg.min_area_frac * h * w)
    regions = [(k, r) for k, r in regions if r.area >= min_px]
    if not regions:
        return []
    largest = max(r.area for _, r in regions)
    regions = sorted([(k, r) for k, r in regions if r.area >= cfg.rel_area * largest], key=lambda kr: -kr[1].area)
    out = []
    for k, r in regions[:cfg.max_objects]:
        cy, cx = r.centroid
        shape = classify_shape(image, ~fg | (nearest == k), r, background, cfg)
        out.append(Detection(names[k], shape, (cx + 0.5) / w, (cy + 0.5) / h, r.area / (h * w)))
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


def score_samples(images: Tensor | np.ndarray, captions: list[str],
                  cfg: DetectorConfig = DetectorConfig()) -> list[dict[str, float | None]]:
    """Per-sample flags for (B, 3, H, W) images ([-1, 1] float or uint8) and their B captions."""
    u8 = to_uint8(images)  # (B, H, W, 3)
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
    from condiff.eval.reference import center_crop_arr

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
    """`condiff align [--preset P] [--resolution R|0] [--n N] [--seed S]`: one Markdown row
    of `validate` (colour / shape / relation / overall per column; mirrored = relation_given_found)."""
    import argparse

    p = argparse.ArgumentParser(prog="condiff align", description=validate.__doc__)
    p.add_argument("--preset", default="default")
    p.add_argument("--resolution", type=int, default=64, help="0: the original sizes")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=400, help="rendered images")
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
