"""FID reference statistics of a shard set (FID_train / FID_val, paper Sec. 3, Tab. 1: the same generated
set against the statistics of the training or of the validation shard set), computed once and cached
under a content hash.

Reference images are brought to the evaluation resolution with the ADM centre crop (box-halve while
>= 2x, bicubic resize of the short side, centre crop), the standard for ImageNet FID, then go through
the extractor's clean resize like the samples (`condiff.eval.features`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from condiff.eval.features import FeatureExtractor, default_cache_dir
from condiff.io.atomic import atomic_path, atomic_write_bytes
from condiff.io.images import IMAGE_EXTS
from condiff.io.shards import expand_shards
from condiff.eval.statistics import FidStats, Moments



def _file_sha256(path: str, memo: dict) -> str:
    """sha256 of a file's bytes, memoised by (absolute path, size, mtime_ns) so re-lookups are instant."""
    st = os.stat(path)
    memo_key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    if memo_key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        memo[memo_key] = h.hexdigest()
    return memo[memo_key]


def reference_key(shards: list[str], extractor: FeatureExtractor, resolution: int, max_images: int | None,
                  cache_dir: Path) -> str:
    """Content hash of the reference set: shard bytes (in sorted order), the extractor's name and weights
    (`FeatureExtractor.weights_sha256`, not a file name), resize, resolution, n."""
    memo_path = cache_dir / "file_sha256.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    h = hashlib.sha256()
    for s in shards:
        h.update(_file_sha256(s, memo).encode())
    setting = {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256, "resize": vars(extractor.resize), "resolution": resolution,
               "max_images": max_images, "crop": "adm-center"}
    h.update(json.dumps(setting, sort_keys=True).encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(memo_path, json.dumps(memo, indent=0).encode())
    return h.hexdigest()[:32]


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM's reference preprocessing: box-halve while the short side >= 2 size, bicubic-resize the short
    side to `size`, centre crop. Returns (size, size, 3) uint8."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


@dataclass
class ShardReadStats:
    images: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few messages, for the report


def iter_shard_images(shards: list[str], resolution: int, stats: ShardReadStats,
                      max_images: int | None = None) -> Iterator[np.ndarray]:
    """Yield (resolution, resolution, 3) uint8 images from webdataset shards in a fixed order. Samples
    without a decodable image (corrupt, truncated, latent-only) are skipped and counted, never raised."""
    import webdataset as wds

    def handler(exn):  # truncated tar etc.: count, warn once per shard, go on
        stats.skipped += 1
        if len(stats.errors) < 10:
            stats.errors.append(repr(exn))
        return True

    ds = wds.WebDataset(shards, shardshuffle=False, handler=handler, empty_check=False,
                        nodesplitter=None, workersplitter=None)
    for sample in ds:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            if ext is None:
                raise ValueError(f"no image field (one of {IMAGE_EXTS}) in sample keys {sorted(sample)}")
            with Image.open(io.BytesIO(sample[ext])) as im:
                arr = center_crop_arr(im, resolution)
        except Exception as exn:  # noqa: BLE001 - bad samples are skipped and counted
            stats.skipped += 1
            if len(stats.errors) < 10:
                stats.errors.append(f"{sample.get('__key__', '?')}: {exn}")
            continue
        stats.images += 1
        yield arr
        if max_images is not None and stats.images >= max_images:
            return


def shard_moments(shards: list[str], extractor: FeatureExtractor, resolution: int,
                  max_images: int | None = None, stats: ShardReadStats | None = None) -> Moments:
    """Feature moments of the images of `shards` (fixed order), in batches of `extractor.batch_size`."""
    stats = stats if stats is not None else ShardReadStats()
    moments, batch = Moments(), []
    if not shards:  # more ranks than shards
        return moments
    for arr in iter_shard_images(shards, resolution, stats, max_images):
        batch.append(arr)
        if len(batch) == extractor.batch_size:
            moments.update(extractor.features(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)))
            batch = []
    if batch:
        moments.update(extractor.features(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)))
    return moments


def _load_stats(path: Path, key: str) -> FidStats:
    """Cached statistics `<cache>/fid_ref/<key>.npz`."""
    with np.load(path) as z:
        return FidStats(z["mu"], z["sigma"], int(z["n"]), key)


def _save_stats(path: Path, ref: FidStats, meta: dict) -> None:
    """Write statistics atomically, with `meta` (what they were computed from) as JSON beside mu / sigma / n."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, mu=ref.mu, sigma=ref.sigma, n=ref.n, meta=json.dumps(meta))


def reference_stats(shards: str | Iterable[str], extractor: FeatureExtractor, resolution: int, *,
                    cache_dir: str | os.PathLike | None = None, max_images: int | None = None,
                    rank: int = 0, world_size: int = 1, gather: Callable | None = None,
                    log: Callable[[str], None] = print) -> FidStats:
    """Statistics of a reference shard set (train or val), computed once and cached as
    `<cache_dir>/fid_ref/<key>.npz` under `reference_key` (content hash).

    Features are reduced on the fly to their moments (`Moments`): the set may hold millions of images.
    Distributed: rank r reads shards r, r + W, ...; `gather(obj) -> list of every rank's obj` (all ranks)
    merges the moments; every rank returns the same statistics. `max_images` caps the count: per rank
    ceil(max_images / W) when distributed."""
    files = sorted(expand_shards(shards))  # the key hashes the set, whatever order it was named in
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = reference_key(files, extractor, resolution, max_images, cache)
    path = cache / "fid_ref" / f"{key}.npz"
    if path.is_file():
        return _load_stats(path, key)
    t0 = time.time()
    stats = ShardReadStats()
    per_rank = None if max_images is None else -(-max_images // world_size)
    moments = shard_moments(files[rank::world_size], extractor, resolution, per_rank, stats)
    if gather is not None:
        parts = gather((moments, stats.images, stats.skipped, stats.errors))
        moments = Moments()
        for part in parts:
            moments.merge(part[0])
        stats.images, stats.skipped = sum(p[1] for p in parts), sum(p[2] for p in parts)
        stats.errors = [e for p in parts for e in p[3]]
    if moments.n < 2:
        raise ValueError(f"reference shards {files[:3]}...: only {moments.n} decodable images "
                         f"({stats.skipped} skipped: {stats.errors[:3]})")
    ref = moments.stats(key)
    if rank == 0:
        _save_stats(path, ref, {"shards": files, "extractor": extractor.name, "resolution": resolution,
                                "skipped": stats.skipped})
    log(f"FID reference: {ref.n} images from {len(files)} shards ({stats.skipped} skipped) in "
        f"{time.time() - t0:.1f} s -> {path}")
    return ref


def shapes_reference_stats(extractor: FeatureExtractor, resolution: int, preset: str = "default", n: int = 2000,
                           seed: int = 0, *, cache_dir: str | os.PathLike | None = None,
                           log: Callable[[str], None] = print) -> FidStats:
    """Statistics of `n` rendered shapes images (`condiff.data.shapes.render(i, preset, seed)`, i < n: the
    images `condiff make-shards shapes --seed SEED` writes) at `resolution` (ADM centre crop, like the
    shards), cached as `<cache_dir>/fid_ref/<key>.npz` with `key` a hash of the shapes config, n, seed,
    the extractor (name, weights, resize) and the resolution. No shards needed: the reference of the
    toy-scale Frechet distance (`condiff.eval.metrics.shapes_fd`)."""
    from condiff.data import shapes

    config = shapes.get_config(preset)
    if n < 2:
        raise ValueError(f"shapes reference statistics: need n >= 2 images, got {n}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    setting = {"source": "shapes", "config": config.to_dict(), "n": n, "seed": seed, "extractor": extractor.name,
               "weights_sha256": extractor.weights_sha256, "resize": vars(extractor.resize),
               "resolution": resolution, "crop": "adm-center"}
    key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:32]
    path = cache / "fid_ref" / f"{key}.npz"
    if path.is_file():
        return _load_stats(path, key)
    t0 = time.time()
    moments = Moments()
    for start in range(0, n, extractor.batch_size):
        batch = np.stack([center_crop_arr(shapes.render(i, config, seed).image, resolution)
                          for i in range(start, min(n, start + extractor.batch_size))])  # (B, R, R, 3)
        moments.update(extractor.features(torch.from_numpy(batch).permute(0, 3, 1, 2)))
    ref = moments.stats(key)
    _save_stats(path, ref, setting)
    log(f"shapes reference: {n} images of preset {preset!r} at {resolution} px in {time.time() - t0:.1f} s -> {path}")
    return ref
