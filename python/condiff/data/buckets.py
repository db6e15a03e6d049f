"""Aspect-ratio buckets for multi-aspect training (SDXL Sec. 2.3 "Multi-Aspect Training", App. I).

A bucket is the (height, width) in PIXELS of the model input in image space (a latent model sees
(height / f, width / f) for an autoencoder of downsample factor f). Every batch comes from one bucket;
an image goes to the bucket nearest its aspect ratio in log space (`nearest_bucket`), is cropped with
the bucket's aspect by the usual crop strategy (`transforms.sample_crop`, so "global" covers 90-100% of
the largest such box) and resized to the bucket. Its control vector records the crop box and flip in
original-image pixels and aspect_ratio = bucket width / height (`cond.CONTROL_H_FIELDS`).

Bucket specs (`data.buckets` in a recipe, `condiff precompute --buckets`), resolved by `resolve_buckets`
for a pixel budget R^2 (R = `data.resolution`) and a side multiple m (the model's patch size times the
autoencoder factor: every side must be a multiple of it so the patch grid is whole):
  ""             no buckets: square R x R crops (the single-aspect default)
  "sdxl"         SDXL's published list (App. I: 40 buckets of about 1024^2 pixels, sides multiples of 64,
                 aspect 1:4 .. 4:1) scaled by R / 1024 (R = 256: sides multiples of 16)
  "auto"         `generate_buckets(R * R, m)`: for every short side that is a multiple of m, the longest
                 side (a multiple of m) within the pixel budget, both ways round, aspect 1:4 .. 4:1
  "auto:A"       the same with at most A:1 aspect (e.g. auto:2 for 1:2 .. 2:1)
  "HxW,HxW,..."  an explicit list, e.g. "16x32,32x16"

Keys: a bucket is written "HxW" (e.g. "128x512" = 128 rows, 512 columns) wherever it names a dict key
(per-bucket counts, throughput, checkpoint meta `train_sizes_by_bucket`).
"""

from __future__ import annotations

import math
import re

from condiff.conditioning.cond import CONTROL_H_FIELDS

from .transforms import CropTransform

_ASPECT = CONTROL_H_FIELDS.index("aspect_ratio")

SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    # (height, width), SDXL App. I (Podell et al. 2023), in the table's order: aspect h/w 0.25 .. 4.0
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
"""SDXL's training buckets at its 1024^2 budget, as published (the table has 704x1344 but no 1344x704)."""

SDXL_BASE = 1024


def bucket_key(bucket: tuple[int, int]) -> str:
    """(H, W) -> "HxW", the key used for per-bucket counts and the checkpoint's `train_sizes_by_bucket`."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def parse_bucket_key(key: str, where: str = "bucket") -> tuple[int, int]:
    """"HxW" -> (H, W); ValueError naming `where` otherwise."""
    h, sep, w = str(key).strip().lower().partition("x")
    try:
        out = (int(h), int(w))
    except ValueError:
        out = None
    if not sep or out is None or min(out) < 1:
        raise ValueError(f"{where}: {key!r} is not a bucket HxW of positive integers (e.g. 128x512)")
    return out


def generate_buckets(area: int, multiple: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """Buckets of at most `area` pixels with sides multiples of `multiple` and aspect ratio in
    [1 / max_aspect, max_aspect]: for every short side s (a multiple, up to the square side), the longest
    multiple L with s L <= area, as (s, L) and (L, s). Sorted by aspect w / h, tall first; holds the square
    side floor(sqrt(area) / m) m."""
    if multiple < 1 or area < multiple * multiple:
        raise ValueError(f"generate_buckets: need multiple >= 1 and area >= multiple^2, got area {area}, multiple {multiple}")
    if max_aspect < 1:
        raise ValueError(f"generate_buckets: max_aspect must be >= 1, got {max_aspect}")
    side = math.isqrt(area) // multiple * multiple
    out = set()
    for short in range(multiple, side + 1, multiple):
        long = (area // short) // multiple * multiple
        if long / short <= max_aspect:
            out.update({(short, long), (long, short)})
    return sorted(out, key=lambda b: b[1] / b[0])


def resolve_buckets(spec: str, resolution: int, multiple: int = 1, where: str = "data.buckets") -> list[tuple[int, int]] | None:
    """The bucket list of a spec (module docstring), or None for "" (square crops). Every side must be
    a positive multiple of `multiple`; errors are ValueErrors naming `where` and the offending value."""
    spec = (spec or "").strip()
    if not spec or spec.lower() == "none":
        return None
    name, _, arg = spec.partition(":")
    if name == "sdxl" and not arg:
        scale = resolution / SDXL_BASE
        buckets = [(round(h * scale), round(w * scale)) for h, w in SDXL_BUCKETS]
        bad = [bucket_key(b) for (b, (h, w)) in zip(buckets, SDXL_BUCKETS) if b[0] != h * scale or b[1] != w * scale]
        if bad:
            raise ValueError(f"{where}: sdxl buckets scaled by {resolution}/{SDXL_BASE} are not whole pixels "
                             f"({', '.join(bad[:3])}...); use a resolution that is a multiple of 16")
    elif name == "auto":
        try:
            max_aspect = float(arg) if arg else 4.0
        except ValueError:
            raise ValueError(f"{where}: {spec!r}: expected auto or auto:MAX_ASPECT (a number >= 1, e.g. auto:2)") from None
        if not max_aspect >= 1:
            raise ValueError(f"{where}: {spec!r}: the maximum aspect must be >= 1")
        if resolution < multiple:
            raise ValueError(f"{where}: auto buckets for resolution {resolution} need sides multiples of {multiple}: "
                             f"the budget {resolution}^2 holds none")
        buckets = generate_buckets(resolution * resolution, multiple, max_aspect)
    elif re.fullmatch(r"[\d\sxX,]*\d[\d\sxX,]*", spec):
        buckets = [parse_bucket_key(item, where) for item in spec.split(",") if item.strip()]
    else:
        raise ValueError(f"{where}: unknown bucket preset {spec!r}; expected '' (square), sdxl, auto, auto:MAX_ASPECT "
                         f"or a list HxW,HxW,...")
    if not buckets:
        raise ValueError(f"{where}: {spec!r} gives no bucket")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"{where}: {spec!r} lists a bucket twice")
    bad = [bucket_key(b) for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        raise ValueError(f"{where}: bucket(s) {', '.join(bad)} have a side that is not a multiple of {multiple} "
                         f"(the model's patch size x the autoencoder factor)")
    return buckets


def nearest_bucket(buckets: list[tuple[int, int]], height: float, width: float) -> int:
    """Index of the bucket whose aspect is nearest to width / height in log space (ties: the first)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


class BucketCrop:
    """image -> (bucket (H, W), tensor (3, H, W) in [-1, 1], control_h (6,), control_l (2,), CropParams).

    With `buckets` the image goes to its nearest bucket (`nearest_bucket` on the decoded size), is cropped
    with the bucket's aspect by `strategy` and resized to it, and control_h's aspect_ratio is the bucket's
    width / height. Without (None), every image is cropped to `resolution` (int: square, as in
    `transforms.CropTransform`), and the aspect_ratio field is the real aspect of the crop box."""

    def __init__(self, buckets: list[tuple[int, int]] | None, resolution: int | tuple[int, int] = 256,
                 strategy: str = "global", flip_prob: float = 0.5, resample: str = "bicubic"):
        self.bucketed = bool(buckets)
        if self.bucketed:
            self.buckets = [(int(h), int(w)) for h, w in buckets]
            self.crops = [CropTransform(b, strategy, flip_prob, resample) for b in self.buckets]
        else:
            hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
            self.buckets, self.crops = [hw], [CropTransform(resolution, strategy, flip_prob, resample)]

    def bucket_of(self, height: int, width: int) -> int:
        """Index of the bucket an image of (height, width) decoded pixels goes to."""
        return nearest_bucket(self.buckets, height, width) if self.bucketed else 0

    def __call__(self, image, rng, orig_hw: tuple[float, float] | None = None):
        i = self.bucket_of(image.size[1], image.size[0])
        x, control_h, control_l, params = self.crops[i](image, rng, orig_hw)
        h, w = self.buckets[i]
        if self.bucketed:
            control_h[_ASPECT] = w / h
        return self.buckets[i], x, control_h, control_l, params
