"""FID through clean-fid, fed from memory: feature extractors, clean-fid's resize convention,
reference statistics of a shard set cached under a content hash.

Conventions (clean-fid's, so that our numbers equal what `cleanfid.fid.compute_fid` reports on the same
images written as PNG files):
  * Images are quantised to uint8 first (what saving a PNG would do): x in [-1, 1] -> round(127.5 (x + 1)).
  * "clean" resize: each channel resized as a float32 PIL image ('F' mode) with bicubic filtering to
    299 x 299, clipped to [0, 255], no re-quantisation (`cleanfid.resize.make_resizer("PIL", False,
    "bicubic", (299, 299))`).
  * The extractor receives (B, 3, S, S) float32 in [0, 255] and returns (B, D) features: clean-fid's
    Inception-V3 TorchScript (pool3, D = 2048), or any custom extractor (clean-fid's
    `custom_feat_extractor`), e.g. `random_extractor()` for offline tests.
  * Statistics: mu = mean over samples, sigma = `np.cov(feats, rowvar=False)` (unbiased, float64);
    distance = `cleanfid.fid.frechet_distance` (Sutherland's stable sqrtm form).

FID_train / FID_val (paper Sec. 3, Tab. 1): the same generated set against the statistics of the training
or of the validation shard set. Reference images are brought to the evaluation resolution with the ADM
centre crop (box-halve while >= 2x, bicubic resize of the short side, centre crop), the standard for
ImageNet FID, then clean-resized like the samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from condiff.io.atomic import atomic_path, atomic_write_bytes
from condiff.io.images import IMAGE_EXTS, to_uint8
from condiff.io.shards import expand_shards

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "CONDIFF_INCEPTION"


def default_cache_dir() -> Path:
    """`$CONDIFF_CACHE` or `$XDG_CACHE_HOME/condiff` (default `~/.cache/condiff`)."""
    if os.environ.get("CONDIFF_CACHE"):
        return Path(os.environ["CONDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condiff"


# ----------------------------------------------------------------------------------------------------
# Images -> extractor input
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeSpec:
    """clean-fid resize (library, quantize_after, filter, size). Part of the reference-statistics key."""

    library: str = "PIL"
    quantize_after: bool = False
    filter: str = "bicubic"
    size: int = 299

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        from cleanfid.resize import make_resizer

        return make_resizer(self.library, self.quantize_after, self.filter, (self.size, self.size))


@dataclass
class FeatureExtractor:
    """`fn((B, 3, S, S) float32 in [0, 255]) -> (B, D)`, with the resize it expects and a stable name.

    `name` identifies the network and its weights (it keys the reference-statistics cache)."""

    fn: Callable[[Tensor], Tensor]
    name: str
    resize: ResizeSpec = field(default_factory=ResizeSpec)
    device: torch.device | str = "cpu"
    batch_size: int = 64

    def __post_init__(self):
        self._resizer = self.resize.build()

    def prepare(self, images_u8: np.ndarray) -> Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 in [0, 255], clean-fid's per-image resize."""
        out = [torch.from_numpy(np.ascontiguousarray(self._resizer(img)).transpose(2, 0, 1).astype(np.float32))
               for img in images_u8]
        return torch.stack(out)

    @torch.no_grad()
    def features(self, images: Tensor | np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) in [-1, 1] or uint8 -> features (B, D) float32 numpy."""
        u8 = to_uint8(images)
        feats = []
        for i in range(0, len(u8), self.batch_size):
            x = self.prepare(u8[i:i + self.batch_size]).to(self.device)
            feats.append(self.fn(x).float().reshape(x.shape[0], -1).cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """Find clean-fid's Inception TorchScript file without downloading.

    Looked up in order: `path` (the file, or a directory holding it), `$CONDIFF_INCEPTION`,
    `<cache>/inception-2015-12-05.pt` (see `default_cache_dir`), `/tmp/inception-2015-12-05.pt`
    (where clean-fid itself downloads it on Linux)."""
    candidates: list[Path] = []
    for p in (path, os.environ.get(INCEPTION_ENV)):
        if p:
            p = Path(p)
            candidates.append(p / INCEPTION_FILE if p.is_dir() else p)
    candidates += [default_cache_dir() / INCEPTION_FILE, Path("/tmp") / INCEPTION_FILE]
    for c in candidates:
        if c.is_file():
            if c.name != INCEPTION_FILE:
                raise ValueError(f"Inception weights {c}: clean-fid loads the file by its name; rename it "
                                 f"to {INCEPTION_FILE} (same directory)")
            return c
    tried = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"FID needs clean-fid's Inception-V3 TorchScript weights '{INCEPTION_FILE}' and nothing may be "
        f"downloaded here. Fetch it on a machine with internet from\n  {INCEPTION_URL}\nthen pass "
        f"--inception PATH (file or directory), or set {INCEPTION_ENV}=PATH, or copy it to "
        f"{default_cache_dir() / INCEPTION_FILE}. Looked in:\n  {tried}")


def inception_extractor(path: str | os.PathLike | None = None, device="cpu", batch_size: int = 64) -> FeatureExtractor:
    """clean-fid's Inception-V3 (pool3, 2048-d) in "clean" mode, from a local file (no download)."""
    from cleanfid.inception_torchscript import InceptionV3W

    file = resolve_inception_path(path)
    model = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()
    return FeatureExtractor(fn=model, name=f"inception-v3-cleanfid:{INCEPTION_FILE}", resize=ResizeSpec(),
                            device=device, batch_size=batch_size)


class RandomConvNet(nn.Module):
    """Small fixed-seed random CNN: (B, 3, S, S) in [0, 255] -> (B, dim). For offline tests only."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, dim, 3, 2, 1)])
        for conv in self.convs:  # explicit seeded init, independent of the global RNG
            nn.init.normal_(conv.weight, std=(2.0 / conv.weight[0].numel()) ** 0.5, generator=gen)
            nn.init.normal_(conv.bias, std=0.1, generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        h = (x - 128.0) / 128.0  # (B, 3, S, S) in [-1, 1]
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h.mean(dim=(2, 3))  # (B, dim)


def random_extractor(dim: int = 32, size: int = 64, seed: int = 0, device="cpu", batch_size: int = 64) -> FeatureExtractor:
    """A clean-fid custom feature extractor made of a random CNN, resizing to `size` (clean bicubic)."""
    net = RandomConvNet(dim, seed).to(device).eval()
    return FeatureExtractor(fn=net, name=f"random-conv:dim={dim}:seed={seed}", resize=ResizeSpec(size=size),
                            device=device, batch_size=batch_size)


def build_extractor(spec: str | None, device="cpu", batch_size: int = 64) -> FeatureExtractor:
    """CLI form: `inception` (default; weights located by `resolve_inception_path`), `inception:PATH`,
    or `random[:DIM[:SIZE[:SEED]]]` (offline tests)."""
    spec = spec or "inception"
    kind, _, rest = spec.partition(":")
    if kind == "inception":
        return inception_extractor(rest or None, device, batch_size)
    if kind == "random":
        args = [int(a) for a in rest.split(":") if a] if rest else []
        if len(args) > 3:
            raise ValueError(f"feature extractor {spec!r}: expected random[:DIM[:SIZE[:SEED]]]")
        return random_extractor(*args, device=device, batch_size=batch_size)
    raise ValueError(f"feature extractor {spec!r}: expected 'inception', 'inception:PATH' or 'random[:DIM[:SIZE[:SEED]]]'")


# ----------------------------------------------------------------------------------------------------
# Statistics and distance
# ----------------------------------------------------------------------------------------------------


@dataclass
class FidStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int
    key: str = ""  # content hash this was computed under ("" if not cached)

    @staticmethod
    def from_features(feats: np.ndarray, key: str = "") -> "FidStats":
        feats = np.asarray(feats)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"FID statistics need (N >= 2, D) features, got {feats.shape}")
        return FidStats(np.mean(feats, axis=0), np.cov(feats, rowvar=False), len(feats), key)


def frechet_distance(a: FidStats, b: FidStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) through `cleanfid.fid.frechet_distance`."""
    from cleanfid.fid import frechet_distance as cf_frechet

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"FID: feature dims differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); the reference "
                         "statistics were computed with another feature extractor")
    with warnings.catch_warnings():  # scipy >= 1.16 deprecates sqrtm(disp=...), which clean-fid passes
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(cf_frechet(a.mu, a.sigma, b.mu, b.sigma))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets, (N, D) and (M, D)."""
    return frechet_distance(FidStats.from_features(feats_a), FidStats.from_features(feats_b))


# ----------------------------------------------------------------------------------------------------
# Reference statistics of a shard set
# ----------------------------------------------------------------------------------------------------


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
    """Content hash of the reference set: shard bytes (in sorted order), extractor, resize, resolution, n."""
    memo_path = cache_dir / "file_sha256.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    h = hashlib.sha256()
    for s in shards:
        h.update(_file_sha256(s, memo).encode())
    setting = {"extractor": extractor.name, "resize": vars(extractor.resize), "resolution": resolution,
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


class Moments:
    """Streaming first and second moments of features (float64, shifted by the first batch's mean for
    accuracy), mergeable across ranks: what reference statistics of millions of images need instead of
    holding every feature. `stats()` equals `FidStats.from_features` of all updates (np.cov, ddof 1)."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, feats: np.ndarray) -> "Moments":
        f = np.asarray(feats, dtype=np.float64)
        if len(f) == 0:
            return self
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        d = f - self.shift  # (b, D)
        self.n += len(f)
        self.s1 += d.sum(axis=0)
        self.s2 += d.T @ d
        return self

    def merge(self, other: "Moments") -> "Moments":
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.shift, self.s1, self.s2 = other.n, other.shift.copy(), other.s1.copy(), other.s2.copy()
            return self
        c = other.shift - self.shift  # re-centre other's sums on self.shift: d_self = d_other + c
        self.s1 += other.s1 + other.n * c
        self.s2 += other.s2 + np.outer(c, other.s1) + np.outer(other.s1, c) + other.n * np.outer(c, c)
        self.n += other.n
        return self

    def stats(self, key: str = "") -> FidStats:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 samples, got {self.n}")
        mean_d = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return FidStats(self.shift + mean_d, sigma, self.n, key)


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
        with np.load(path) as z:
            return FidStats(z["mu"], z["sigma"], int(z["n"]), key)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, mu=ref.mu, sigma=ref.sigma, n=ref.n,
                     meta=json.dumps({"shards": files, "extractor": extractor.name, "resolution": resolution,
                                      "skipped": stats.skipped}))
    log(f"FID reference: {ref.n} images from {len(files)} shards ({stats.skipped} skipped) in "
        f"{time.time() - t0:.1f} s -> {path}")
    return ref
