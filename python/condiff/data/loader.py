"""Streaming reader for webdataset tar shards (img2dataset layout, or latent shards from `precompute`).

Sample layout read (one tar member per field, grouped by key, parsed by the `webdataset` library):
  image    `jpg` / `jpeg` / `png` / `webp` (any PIL mode; converted to RGB, see `transforms.to_rgb`)
  caption  `txt`, else the json field `caption`
  label    `cls` (an integer), else the json field `label`
  json     per-sample metadata; `original_height` / `original_width` (img2dataset) give the original size
  latent   `safetensors` written by `condiff precompute` (see `precompute.py`): then the batch has
           `latent` instead of `image`, and text states when they were precomputed. Each sample stores
           several views (crops, and their mirrors when precomputed with flips); every epoch one is drawn
           per sample (flip with `flip_prob`, then a crop), from the same per-(epoch, sample) RNG as image
           crops. A `crop` or flips the stored views cannot provide is an error (`check_latent_views`).

Batches (docs/ARCHITECTURE.md): `image` (B,3,R,R) float32 in [-1,1] or `latent` (B,C,h,w) float32;
`bucket` (H, W) the image-space size of the batch (R, R without buckets; h, w times the autoencoder factor);
`label` (B,) int64 (class data); `caption` list[str] (text data); `control_h` (B,6), `control_l` (B,2)
float32; `key` list[str]; precomputed text adds `text` (B,T,C), `text_lengths` (B,) int64, `pooled` (B,Cp).

Splitting, shuffling, resuming. A "slot" is one (rank, worker) pair, slot = rank * num_workers + worker,
S = world_size * num_workers slots in all. Each epoch e, every slot permutes the shard list with the same
seeded permutation (seed, e); with >= S shards slot i reads shards i, i+S, ...; with fewer shards every
slot reads all of them and keeps raw samples i, i+S, ... Either way no sample is read by two slots.
Each slot then shuffles its raw (undecoded) sample stream with a buffer of `shuffle_buffer` samples and
an RNG seeded by (seed, e, slot). Crop/flip use an RNG seeded by (seed, e, shard file name, sample key),
so a sample's view depends neither on the worker count nor on the rank count.
The POSITION of a run is, per slot, (epoch, number of raw samples of that epoch's shuffled stream
already consumed) -- skipped bad samples included -- for the batches the training loop has actually
received (prefetched batches do not count). `ShardLoader.state_dict()` returns it (JSON-able);
`load_state_dict` resumes exactly there: the slot replays its stream without decoding up to the
position, so the next batches are identical to those an uninterrupted run would have produced. The
position also records which worker's batch is due next (`next_worker`; DataLoader takes batches from
its workers round-robin), and a resumed loader rotates its workers to continue that rotation.
A position is only valid for the same shard list, seed, world size, number of workers and buckets (checked).
In DDP each rank holds only its own slots: gather every rank's `state_dict()["slots"]` and merge them
(`merge_positions`) before saving; every rank can load the merged dict.

Aspect buckets (`LoaderConfig.buckets`, see `buckets.py`): each image goes to the bucket nearest its
aspect ratio and is cropped to it; latents are grouped by their stored size. A slot keeps one partial
batch per bucket and emits a bucket's batch when it holds `batch_size` samples, so every batch comes from
one bucket and is full (no padding); the batch order follows from the seeded stream. The position then
also lists the [epoch, count] of the samples waiting in partial batches; a resumed slot re-reads and
decodes them (same views) before it continues, so resuming stays exact. Per-bucket sample counts:
`ShardLoader.bucket_counts()`. Without buckets there is one group and nothing waits between batches.

With `epochs=None` (default, for step-based training) each slot streams epochs forever, so ranks never
run dry at different times; with a finite `epochs` iteration ends after that many epochs per slot.

Bad samples never stop the stream: undecodable / truncated images, samples without an image, a missing
caption (text data) or label (class data), images with a short side below `min_size`, unreadable latent
files, a non-integer `cls`, a json that does not parse, and unreadable or truncated tar files are skipped, counted in `ShardLoader.stats` and named
(sample key and shard) in a warning on the `condiff.data` logger (the first 100 per reason and worker;
the counts stay exact). A slot whose whole epoch yields no usable sample raises a RuntimeError with the
counts (e.g. text conditioning on shards without captions) instead of spinning forever.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import filters as wds_filters
from webdataset import tariterators

from condiff.conditioning.cond import CONTROL_H_FIELDS
from condiff.io.images import IMAGE_EXTS
from condiff.io.shards import expand_shards

from .buckets import BucketCrop, bucket_key
from .transforms import to_rgb

_FLIP = CONTROL_H_FIELDS.index("flip")

log = logging.getLogger("condiff.data")

LATENT_EXT = "safetensors"


# -------------------------------------------------------------------------------------------- config
@dataclass
class LoaderConfig:
    """Everything the reader needs (JSON-able; the trainer stores it in the run's meta)."""

    shards: str | list[str] = ""
    batch_size: int = 64
    resolution: int = 256  # square output side in pixels (ignored for latent shards and with buckets)
    buckets: list | None = None  # [[H, W], ...] aspect buckets in pixels (`buckets.resolve_buckets`); None: square
    crop: str = "global"  # global | local | mix | center (transforms.CROP_RATIOS)
    flip_prob: float = 0.5
    conditioning: str = "class"  # class (needs a label) | text (needs a caption) | none
    num_workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 1000  # samples; <= 1 disables sample shuffling
    shuffle_shards: bool = True
    epochs: int | None = None  # None: stream forever
    drop_last: bool = True  # only matters at the end of a finite stream
    min_size: int = 0  # skip images whose short side (decoded pixels) is below this
    resample: str = "bicubic"
    rank: int | None = None  # None: torch.distributed rank (0 when not initialised)
    world_size: int | None = None
    pin_memory: bool = False

    def __post_init__(self):
        if self.conditioning not in ("class", "text", "none"):
            raise ValueError(f"LoaderConfig.conditioning must be class | text | none, got {self.conditioning!r}")
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.buckets is not None:
            ok = isinstance(self.buckets, (list, tuple)) and len(self.buckets) > 0 and all(
                isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(v, int) and v > 0 for v in b) for b in self.buckets)
            if not ok:
                raise ValueError(f"LoaderConfig.buckets must be a non-empty list of [height, width] positive ints, got {self.buckets!r}")
            self.buckets = [[int(h), int(w)] for h, w in self.buckets]
        BucketCrop(self.buckets, self.resolution, self.crop, self.flip_prob, self.resample)  # validates crop/flip/resample

    def to_dict(self) -> dict:
        return asdict(self)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed_int(*parts) -> int:
    """A stable 64-bit seed from strings / ints (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


# ------------------------------------------------------------------------------------ sample decoding
class SkipSample(Exception):
    """Raised by the decoder for a sample that must be skipped; `.reason` is the stats counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _text_field(sample: dict, name: str) -> str | None:
    v = sample.get(name)
    if v is None:
        return None
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def parse_fields(sample: dict, cfg: LoaderConfig) -> tuple[dict, dict]:
    """(out, meta): `out` holds key and the caption / label the conditioning needs; `meta` the parsed json.
    Raises SkipSample (bad_json, bad_label, missing_label, missing_caption)."""
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                meta = {}
        except (ValueError, UnicodeDecodeError) as exn:
            raise SkipSample("bad_json", str(exn)) from None
    out: dict = {"key": sample["__key__"]}

    caption = _text_field(sample, "txt")
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    label = None
    if "cls" in sample:
        try:
            label = int(_text_field(sample, "cls").strip())
        except (ValueError, UnicodeDecodeError):
            if cfg.conditioning == "class":  # a label nobody asked for may be malformed
                raise SkipSample("bad_label", f"cls field is not an integer: {sample['cls'][:20]!r}") from None
    elif meta.get("label") is not None:
        try:
            label = int(meta["label"])
        except (TypeError, ValueError):
            if cfg.conditioning == "class":
                raise SkipSample("bad_label", f"json label is not an integer: {meta['label']!r}") from None
    if cfg.conditioning == "text":
        if caption is None:
            raise SkipSample("missing_caption", "no txt field and no json 'caption'")
        out["caption"] = caption.strip()
    elif cfg.conditioning == "class":
        if label is None:
            raise SkipSample("missing_label", "no cls field and no json 'label'")
        out["label"] = label
    if caption is not None and cfg.conditioning != "text":
        out["caption"] = caption.strip()
    if label is not None and cfg.conditioning != "class":
        out["label"] = label
    return out, meta


def load_image(sample: dict, meta: dict, cfg: LoaderConfig, stats: Counter) -> tuple[Image.Image, tuple[float, float] | None]:
    """(RGB image, original (height, width) from the json or None). Raises SkipSample (no_image,
    corrupt_image, too_small); counts mode conversions in `stats` as converted_<mode>."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SkipSample("no_image", f"no field among {IMAGE_EXTS}; fields: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        image = Image.open(io.BytesIO(sample[ext]))
        image.load()
        image, converted = to_rgb(image)
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    if converted is not None:
        stats[f"converted_{converted}"] += 1
    w, h = image.size
    if min(h, w) < cfg.min_size:
        raise SkipSample("too_small", f"{w}x{h} < min_size {cfg.min_size}")
    orig = None
    if "original_height" in meta and "original_width" in meta:
        orig = (float(meta["original_height"]), float(meta["original_width"]))
    return image, orig


def decode_sample(sample: dict, cfg: LoaderConfig, transform: BucketCrop, rng: np.random.Generator, stats: Counter,
                  latent_factor: int = 1) -> dict:
    """One raw webdataset sample (bytes per field) -> dict of per-sample arrays (see module docstring) and
    `bucket` (H, W): the image-space size of the output (for a latent, its size x `latent_factor`, the
    autoencoder's downsample factor).

    Raises SkipSample for samples that must be skipped; counts mode conversions in `stats`."""
    out, meta = parse_fields(sample, cfg)
    if LATENT_EXT in sample:
        out = _decode_latent(sample, meta, out, cfg, rng)
        h, w = out["latent"].shape[-2:]
        out["bucket"] = (int(h) * latent_factor, int(w) * latent_factor)
        return out
    image, orig = load_image(sample, meta, cfg, stats)
    bucket, x, control_h, control_l, _ = transform(image, rng, orig)
    out.update(image=x, control_h=control_h, control_l=control_l, bucket=bucket)
    return out


def _decode_latent(sample: dict, meta: dict, out: dict, cfg: LoaderConfig, rng: np.random.Generator) -> dict:
    """One stored view of a precomputed sample: flip drawn with `cfg.flip_prob` (0 = only un-flipped views),
    then a view of that flip uniformly (the crops of `precompute --views K`); `rng` is the per (epoch, sample)
    RNG, so the choice is deterministic and changes every epoch."""
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(bytes(sample[LATENT_EXT]))
        latent, control_h, control_l = tensors["latent"], tensors["control_h"], tensors["control_l"]
    except Exception as exn:
        raise SkipSample("bad_latent", f"{type(exn).__name__}: {exn}") from None
    want_flip = bool(cfg.flip_prob > 0 and rng.random() < cfg.flip_prob)
    candidates = np.flatnonzero((control_h[:, _FLIP].numpy() == 1.0) == want_flip)
    if candidates.size == 0:
        raise SkipSample("no_view", f"no stored view with flip={int(want_flip)} (flip_prob {cfg.flip_prob})")
    a = int(candidates[rng.integers(candidates.size)])
    out.update(latent=latent[a].float(), control_h=control_h[a].float().numpy(), control_l=control_l.float().numpy())
    if "text" in tensors:
        out["text"] = tensors["text"].float()  # (L, C) valid tokens only
        out["text_max_length"] = int(meta.get("text_max_length", tensors["text"].shape[0]))
        out["pooled"] = tensors["pooled"].float()
    return out


PRECOMPUTE_SETTINGS = "precompute.json"


def check_latent_views(cfg: LoaderConfig, shards: list[str]) -> dict | None:
    """For latent shards (a `precompute.json` beside the first shard): refuse a crop strategy, flips or aspect
    buckets that the stored views cannot provide, naming both. Returns the precompute settings, or None for
    image shards."""
    path = os.path.join(os.path.dirname(os.path.abspath(shards[0])), PRECOMPUTE_SETTINGS) if shards else ""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        settings = json.load(f)
    crop, views = settings.get("crop"), settings.get("views", settings.get("augmentations", 1))
    flips = bool(settings.get("flip", settings.get("flip_prob", 0) > 0))
    where = f"the latent shards beside {path} ({views} crop view(s) per image, crop {crop!r}, flips {flips})"
    if crop != cfg.crop:
        raise ValueError(f"crop {cfg.crop!r} (data.crop) cannot be provided by {where}: re-run `condiff precompute "
                         f"--crop {cfg.crop} --views K`, or set data.crop={crop}")
    if cfg.flip_prob > 0 and not flips:
        raise ValueError(f"flips (data.flip, flip_prob {cfg.flip_prob}) cannot be provided by {where}: re-run "
                         f"`condiff precompute --flip`, or set data.flip=false")
    stored = settings.get("buckets")
    if stored != cfg.buckets:
        have = f"buckets {stored} (--buckets {settings.get('bucket_spec')!r})" if stored else "square latents (no --buckets)"
        raise ValueError(f"data.buckets {cfg.buckets or 'none (square)'} differ from the latent shards beside {path}, "
                         f"which hold {have}: train with the buckets they were precomputed with, or re-run "
                         f"`condiff precompute --buckets ...`")
    return settings


def latent_factor(settings: dict | None) -> int:
    """Pixels per latent of a precompute (`precompute.json`): its `downsample`, else (older precomputes)
    1 for the pixels autoencoder and the factor in a diffusers VAE's config.json (8 when unreadable)."""
    if not settings:
        return 1
    if settings.get("downsample"):
        return int(settings["downsample"])
    ae = settings.get("autoencoder") or {}
    if ae.get("kind", "pixels") == "pixels":
        return 1
    try:
        with open(os.path.join(ae.get("path", ""), "config.json")) as f:
            return 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 8


def collate(samples: list[dict]) -> dict:
    """List of decoded samples (all of one bucket) -> batch dict (docs/ARCHITECTURE.md)."""
    batch: dict = {"key": [s["key"] for s in samples]}
    if "bucket" in samples[0]:
        batch["bucket"] = tuple(samples[0]["bucket"])
    for name in ("image", "latent"):
        if name in samples[0]:  # numpy stack: single-threaded (see transforms.to_tensor)
            batch[name] = torch.from_numpy(np.stack([s[name].numpy() for s in samples]))
    batch["control_h"] = torch.from_numpy(np.stack([s["control_h"] for s in samples])).float()
    batch["control_l"] = torch.from_numpy(np.stack([s["control_l"] for s in samples])).float()
    if all("label" in s for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    if all("caption" in s for s in samples):
        batch["caption"] = [s["caption"] for s in samples]
    if "text" in samples[0]:
        t = max(s["text_max_length"] for s in samples)
        states = torch.zeros(len(samples), t, samples[0]["text"].shape[-1])
        for i, s in enumerate(samples):
            states[i, : s["text"].shape[0]] = s["text"]
        batch["text"] = states
        batch["text_lengths"] = torch.tensor([s["text"].shape[0] for s in samples], dtype=torch.int64)
        batch["pooled"] = torch.stack([s["pooled"] for s in samples])
    return batch


def iter_raw_samples(shards: list[str], stats: Counter):
    """Raw samples (dict of bytes per field, `__key__`, `__url__`) of `shards` in order, parsed by
    webdataset; unreadable or truncated tar files are counted in `stats["shard_errors"]`, warned about,
    and the stream goes on with the next shard."""

    def handler(exn: Exception) -> bool:
        stats["shard_errors"] += 1
        log.warning("skipping the rest of a shard after a read error: %s", exn)
        return True

    def opened():
        for url in shards:
            try:
                stream = open(url, "rb")
            except OSError as exn:
                handler(exn)
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    files = tariterators.tar_file_expander(opened(), handler=handler)
    return tariterators.group_by_keys(files, handler=handler)


MAX_WARNINGS_PER_REASON = 100


def _warn_skip(stats: Counter, reason: str, key: str, url: str, exn: Exception) -> None:
    """Count a skipped sample; name it in a warning (the first MAX_WARNINGS_PER_REASON per reason and
    slot, so that a shard set with many bad samples does not flood the log; the counts stay exact)."""
    stats[f"skipped_{reason}"] += 1
    n = stats[f"skipped_{reason}"]
    if n <= MAX_WARNINGS_PER_REASON:
        log.warning("skipping sample %r from %s: %s", key, url, exn)
        if n == MAX_WARNINGS_PER_REASON:
            log.warning("further %r skips in this worker are counted without a warning (see ShardLoader.stats)", reason)


# ------------------------------------------------------------------------------------------- stream
class ShardStream(IterableDataset):
    """The per-slot stream of batches (see module docstring). Used through `ShardLoader`.

    `resume` maps a slot to (epoch, count, pending): `pending` lists the [epoch, count] stream positions of
    the samples already read but still waiting in a bucket's partial batch; they are decoded again (same
    per-sample RNG, so the same views) before the stream continues after `count`."""

    def __init__(self, cfg: LoaderConfig, shards: list[str], rank: int, world_size: int, resume: dict[int, tuple],
                 first_worker: int = 0, latent_factor: int = 1):
        self.cfg, self.shards, self.rank, self.world_size, self.resume = cfg, shards, rank, world_size, resume
        self.first_worker, self.latent_factor = first_worker, latent_factor
        self.transform = BucketCrop(cfg.buckets, cfg.resolution, cfg.crop, cfg.flip_prob, cfg.resample)

    def _raw(self, epoch: int, slot: int, slots: int, stats: Counter):
        """The slot's shuffled raw sample stream of `epoch`."""
        cfg = self.cfg
        shards = list(self.shards)
        if cfg.shuffle_shards:
            random.Random(_seed_int(cfg.seed, epoch, "shards")).shuffle(shards)
        stride = 1
        if len(shards) >= slots:
            shards = shards[slot::slots]
        else:
            stride = slots
        raw = iter_raw_samples(shards, stats)
        if stride > 1:
            raw = (s for i, s in enumerate(raw) if i % stride == slot)
        if cfg.shuffle_buffer > 1:
            rng = random.Random(_seed_int(cfg.seed, epoch, "samples", slot))
            raw = wds_filters._shuffle(raw, bufsize=cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)
        return raw, len(shards)

    def _decode(self, sample: dict, epoch: int, stats: Counter) -> dict:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        rng = np.random.default_rng(_seed_int(self.cfg.seed, epoch, os.path.basename(url), key))
        return decode_sample(sample, self.cfg, self.transform, rng, stats, self.latent_factor)

    def _replay(self, positions: list, slot: int, slots: int) -> dict[tuple, list]:
        """The partial batches of a resumed slot: the samples at `positions` ([epoch, count], stream order),
        decoded again and grouped by bucket in that order."""
        pending: dict[tuple, list] = {}
        wanted: dict[int, set] = {}
        for e, c in positions:
            wanted.setdefault(int(e), set()).add(int(c))
        for e in sorted(wanted):
            scratch: Counter = Counter()
            raw, _ = self._raw(e, slot, slots, scratch)
            for count, sample in enumerate(raw, start=1):
                if count in wanted[e]:
                    try:
                        out = self._decode(sample, e, scratch)
                    except SkipSample as exn:
                        raise RuntimeError(f"data slot {slot}: the sample at epoch {e}, position {count} of its stream "
                                           f"was usable when the position was saved but not now ({exn}); were the "
                                           f"shards changed?") from None
                    pending.setdefault(out["bucket"], []).append((out, (e, count)))
                if count >= max(wanted[e]):
                    break
        return pending

    def __iter__(self):
        cfg = self.cfg
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # DataLoader takes batches from its workers round-robin starting at worker 0: rotate so that its
        # worker 0 serves the worker whose batch is due next (a resumed run continues the rotation)
        worker = (worker + self.first_worker) % workers
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        epoch, start, held = self.resume.get(slot, (0, 0, []))
        stats: Counter = Counter()
        # bucket -> [(sample, (epoch, count))]: one partial batch per bucket, in stream order; a bucket's
        # entry is removed when its batch is emitted, so the dict order is that of each batch's first sample
        pending = self._replay(held, slot, slots) if held else {}
        count = 0
        while cfg.epochs is None or epoch < cfg.epochs:
            raw, n_shards = self._raw(epoch, slot, slots, stats)
            count = usable = 0
            for count, sample in enumerate(raw, start=1):
                if count <= start:
                    continue
                stats["read"] += 1
                try:
                    out = self._decode(sample, epoch, stats)
                except SkipSample as exn:
                    _warn_skip(stats, exn.reason, sample.get("__key__", "?"), sample.get("__url__", "?"), exn)
                    continue
                usable += 1
                group = pending.setdefault(out["bucket"], [])
                group.append((out, (epoch, count)))
                if len(group) == cfg.batch_size:
                    del pending[out["bucket"]]
                    yield self._emit([o for o, _ in group], slot, (epoch, count, _held(pending)), stats)
            if start == 0 and usable == 0:
                what = "readable" if count == 0 else "usable"
                raise RuntimeError(
                    f"data slot {slot} (rank {self.rank}, worker {worker}) got no {what} sample in epoch {epoch} "
                    f"from {n_shards} shard(s) with {slots} slot(s) (conditioning={cfg.conditioning!r}); stats: {dict(stats)}"
                )
            epoch, start = epoch + 1, 0
        while pending and not cfg.drop_last:  # the end of a finite stream: the partial batches, in order
            bucket = next(iter(pending))
            group = pending.pop(bucket)
            yield self._emit([o for o, _ in group], slot, (epoch - 1, count, _held(pending)), stats)
        # end of a finite stream: a marker carrying the final position and counts (not a batch)
        yield {"_end": True, "_position": (slot, (epoch, 0, [])), "_stats": (slot, dict(stats))}

    @staticmethod
    def _emit(samples: list[dict], slot: int, position: tuple, stats: Counter) -> dict:
        batch = collate(samples)
        stats["samples"] += len(samples)
        stats[f"bucket_{bucket_key(batch['bucket'])}"] += len(samples)
        batch["_position"] = (slot, position)
        batch["_stats"] = (slot, dict(stats))
        return batch


def _held(pending: dict[tuple, list]) -> list[list[int]]:
    """[[epoch, count], ...] of the samples waiting in partial batches, in stream order."""
    return sorted([int(e), int(c)] for group in pending.values() for _, (e, c) in group)


# ------------------------------------------------------------------------------------------- loader
def merge_positions(slot_dicts: list[dict]) -> dict:
    """Union of several ranks' `state_dict()["slots"]` (for DDP checkpoints)."""
    merged: dict = {}
    for d in slot_dicts:
        merged.update(d)
    return merged


class ShardLoader:
    """Iterable of batches over a shard set, with an exact resumable position and bad-sample counts.

    >>> loader = ShardLoader(LoaderConfig(shards="data/shard-{000000..000009}.tar", batch_size=64, resolution=32))
    >>> for batch in loader: ...          # batch dict, see module docstring
    >>> state = loader.state_dict()       # store in the checkpoint; later: loader.load_state_dict(state)
    """

    def __init__(self, config: LoaderConfig | dict):
        self.config = config if isinstance(config, LoaderConfig) else LoaderConfig(**config)
        self.shards = expand_shards(self.config.shards)
        self.precompute = check_latent_views(self.config, self.shards)  # crop / flips the latent views can give
        rank, world = _dist_rank_world()
        self.rank = rank if self.config.rank is None else self.config.rank
        self.world_size = world if self.config.world_size is None else self.config.world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ShardLoader: rank {self.rank} is not in [0, world_size={self.world_size})")
        self.latent_factor = latent_factor(self.precompute)
        self._slots: dict[int, tuple[int, int, list]] = {}  # slot -> (epoch, count, pending [[epoch, count], ...])
        self._slot_stats: dict[int, dict] = {}
        self._next_worker = 0  # this rank's worker whose batch comes next (round-robin)

    @property
    def num_workers(self) -> int:
        return max(1, self.config.num_workers)

    def _fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.shards).encode()).hexdigest()[:16]

    def __iter__(self):
        stream = ShardStream(self.config, self.shards, self.rank, self.world_size, dict(self._slots), self._next_worker,
                             self.latent_factor)
        kw = {}
        if self.config.num_workers > 0:
            kw = dict(prefetch_factor=2, persistent_workers=False)
        dl = DataLoader(stream, batch_size=None, num_workers=self.config.num_workers, pin_memory=self.config.pin_memory, **kw)
        for batch in dl:
            slot, (epoch, count, held) = batch.pop("_position")
            self._slots[int(slot)] = (int(epoch), int(count), held)
            self._next_worker = (int(slot) % self.num_workers + 1) % self.num_workers
            slot, stats = batch.pop("_stats")
            self._slot_stats[int(slot)] = stats
            if not batch.pop("_end", False):
                batch["bucket"] = tuple(int(v) for v in batch["bucket"])  # DataLoader turns tuples into lists
                yield batch

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's slots: read, samples, skipped_<reason>, converted_<mode>,
        shard_errors (as of the last batch received)."""
        total: Counter = Counter()
        for s in self._slot_stats.values():
            total.update(s)
        return dict(total)

    def bucket_counts(self) -> dict[str, int]:
        """Samples batched per bucket ("HxW" -> count, `buckets.bucket_key`) by this rank since the loader
        started iterating; with `config.buckets`, every configured bucket is listed (0 when empty)."""
        counts = {key: 0 for key in map(bucket_key, self.config.buckets or [])}
        for k, v in self.stats.items():
            if k.startswith("bucket_"):
                counts[k[len("bucket_"):]] = v
        return counts

    def report(self) -> str:
        s = self.stats
        skipped = {k: v for k, v in s.items() if k.startswith("skipped_") or k == "shard_errors"}
        return f"data: read {s.get('read', 0)}, batched {s.get('samples', 0)}, skipped {skipped or 'none'}, " + (
            f"converted {({k: v for k, v in s.items() if k.startswith('converted_')})}, per bucket {self.bucket_counts()}"
        )

    def state_dict(self) -> dict:
        return {
            "version": 2,
            "seed": self.config.seed,
            "buckets": self.config.buckets,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shards": self._fingerprint(),
            "slots": {str(k): [v[0], v[1], [list(p) for p in v[2]]] for k, v in sorted(self._slots.items())},
            "next_worker": self._next_worker,
        }

    def load_state_dict(self, state: dict) -> None:
        expect = {"seed": self.config.seed, "world_size": self.world_size, "num_workers": self.num_workers,
                  "shards": self._fingerprint(), "buckets": self.config.buckets}
        diff = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
        if diff:
            raise ValueError(
                "data position does not match this loader (saved, current): "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                + "; resume with the same shard list, seed, world size, num_workers and buckets"
            )
        self._slots = {int(k): (int(v[0]), int(v[1]), [list(p) for p in (v[2] if len(v) > 2 else [])])
                       for k, v in state["slots"].items()}
        self._next_worker = int(state.get("next_worker", 0))
