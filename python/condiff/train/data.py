"""The trainer's view of its data: `condiff.data.ShardLoader` batches, condition dropout, and an exact,
resumable position.

* Batches come from DATA's webdataset reader (`condiff.data.loader.ShardLoader`), split over ranks and
  workers, deterministic given (seed, epoch), with a per-slot position that resumes exactly.
* Condition dropout for guidance (`condiff.data.conditions.CondDropout`) is applied here, per sample,
  with INDEPENDENT semantic (probability `label_drop`: label -> null class, caption -> "") and control
  (probability `control_drop`: control_keep -> False) drops, drawn from the rank's global torch RNG,
  whose state is checkpointed (Eq. 2 needs both null branches).
* The training size distribution (original [h, w] of the samples seen, capped) is collected from the
  batches' `control_l`, so sampling can condition on sizes the model saw (Tab. 2b); with aspect buckets
  also per bucket (`BucketSizes`), so sampling at an aspect draws the sizes seen at that aspect.
* Aspect buckets (`data.buckets`, `condiff.data.buckets`) are resolved here against the model: every side
  must be a multiple of the patch size times the autoencoder factor (`input_multiple`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from condiff.train.config import DataConfig


def dataset_info(shards: str) -> dict:
    """`dataset.json` written by `condiff make-shards` next to the shards ({} when absent)."""
    from condiff.io.shards import expand_shards

    try:
        first = Path(expand_shards(shards)[0])
    except (FileNotFoundError, IndexError):
        return {}
    path = first.parent / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# Built-in sets a recipe may name by path: created on first use (the recipes in configs/tiny/ point here).
BUILTIN_SHARDS = {"data/shapes-demo": {"preset": "demo", "n": 4096, "seed": 0}}


def builtin_command(shards: str) -> str | None:
    """The `condiff make-shards` command that writes the built-in set `shards` names (None if it names none)."""
    spec = BUILTIN_SHARDS.get(os.path.normpath(str(shards)))
    if spec is None:
        return None
    return f"condiff make-shards shapes --preset {spec['preset']} --n {spec['n']} --seed {spec['seed']} --out {shards}"


def ensure_builtin_shards(cfg: DataConfig) -> None:
    """Write the built-in set named by `cfg.shards` when it is missing (stating so, with the command, on
    stderr); other specs are left to `check_shards`. Atomic: written beside the target, then renamed."""
    from condiff.data.make_shards import write_shapes

    key = os.path.normpath(str(cfg.shards or ""))
    if key not in BUILTIN_SHARDS or Path(key, "dataset.json").is_file():
        return
    spec = BUILTIN_SHARDS[key]
    print(f"[condiff] {cfg.shards} is missing: creating the built-in shapes set ({spec['n']} images, about a "
          f"minute on a CPU), the same as `{builtin_command(cfg.shards)}`", file=sys.stderr)
    tmp = Path(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shapes(str(tmp), spec["n"], seed=spec["seed"], preset=spec["preset"])
    if Path(key).exists():
        shutil.rmtree(key)
    os.replace(tmp, key)


def check_shards(cfg: DataConfig, conditioning: str, peek: int = 16) -> list[str]:
    """The shard files of `cfg.shards`; ConfigError when the spec matches no file, or when a
    text-conditioned model meets shards whose first `peek` samples carry no caption."""
    from condiff.data.loader import LoaderConfig, SkipSample, expand_shards, iter_raw_samples, parse_fields
    from condiff.train.config import ConfigError

    if not cfg.shards:
        raise ConfigError("data.shards: no shards given (a path, glob, brace pattern or directory of .tar files; "
                          "`condiff make-shards shapes --out DIR` writes a built-in set)")
    try:
        files = expand_shards(cfg.shards)
    except FileNotFoundError as e:
        raise ConfigError(f"data.shards: {e}") from None
    if conditioning == "text":
        loader_cfg = LoaderConfig(shards=cfg.shards, conditioning="text")
        seen = 0
        for sample in iter_raw_samples(files[:1], Counter()):
            try:
                parse_fields(sample, loader_cfg)
                return files
            except SkipSample:
                seen += 1
            if seen == peek:
                break
        if seen:
            raise ConfigError(f"data.shards: the first {seen} samples of {files[0]} have no caption (no `txt` field, no "
                              f"json 'caption'); model.conditioning=text needs captioned shards")
    return files


def input_multiple(model_config: dict, downsample: int) -> int:
    """Pixels every image side must be a multiple of: the patch size (transformers) or the UNet's total
    downsampling 2^(levels - 1), times the autoencoder's downsample factor. `model_config`: a model's
    `.config` dict."""
    patch = model_config.get("patch_size")
    if patch is None:
        patch = 2 ** (len(model_config.get("channel_mult", [1])) - 1)
    return int(patch) * int(downsample)


def resolve_train_buckets(cfg: DataConfig, multiple: int) -> list[list[int]] | None:
    """`data.buckets` as [[H, W], ...] pixels (None: square crops); ConfigError naming data.buckets."""
    from condiff.data.buckets import resolve_buckets
    from condiff.train.config import ConfigError

    try:
        buckets = resolve_buckets(cfg.buckets, cfg.resolution, multiple)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return None if buckets is None else [list(b) for b in buckets]


def rounded_sizes(control_l: torch.Tensor) -> list[list[int]]:
    """(B, 2) original (h, w) size conditions -> [[h, w], ...] as the nearest integers (checkpoint meta rows)."""
    return [[int(round(h)), int(round(w))] for h, w in control_l.tolist()]


class BucketSizes:
    """Original [h, w] sizes seen in training per bucket ("HxW" -> [[h, w], ...], at most `cap` each):
    checkpoint meta `train_sizes_by_bucket` (see `condiff.io.checkpoint`)."""

    CAP = 1024  # rows per bucket

    def __init__(self, sizes: dict | None = None, cap: int = CAP):
        self.cap = cap
        self.sizes: dict[str, list[list[int]]] = {k: [list(map(int, s)) for s in v] for k, v in (sizes or {}).items()}

    def add(self, bucket: tuple[int, int], control_l: torch.Tensor) -> None:
        from condiff.data.buckets import bucket_key

        rows = self.sizes.setdefault(bucket_key(bucket), [])
        room = self.cap - len(rows)
        if room > 0:
            rows.extend(rounded_sizes(control_l[:room]))

    @staticmethod
    def merge(parts: list[dict[str, list[list[int]]]], cap: int = CAP) -> dict[str, list[list[int]]]:
        """Every rank's `sizes` in one dict: per bucket the ranks' rows concatenated (rank order), then at most
        `cap`, evenly strided (`condiff.io.checkpoint.cap_sizes`)."""
        from condiff.io.checkpoint import cap_sizes

        keys = sorted({k for part in parts for k in part})
        return {k: cap_sizes([row for part in parts for row in part.get(k, [])], cap) for k in keys}


class TrainStream:
    """Endless batches for one rank with dropout applied; `state_dict()` is this rank's position."""

    def __init__(self, cfg: DataConfig, *, conditioning: str, batch_size: int, rank: int, world_size: int, seed: int,
                 num_classes: int, null_text=None, buckets: list[list[int]] | None = None):
        from condiff.data.conditions import CondDropout, DropoutConfig
        from condiff.data.loader import LoaderConfig, ShardLoader
        from condiff.train.config import ConfigError

        self.cfg, self.num_classes = cfg, num_classes
        try:  # a crop, flips or buckets that latent shards cannot provide: one line naming the data.* key
            self.loader = ShardLoader(LoaderConfig(
                shards=cfg.shards, batch_size=batch_size, resolution=cfg.resolution, buckets=buckets, crop=cfg.crop,
                flip_prob=0.5 if cfg.flip else 0.0, conditioning=conditioning, num_workers=cfg.workers, seed=seed,
                rank=rank, world_size=world_size, shuffle_buffer=cfg.shuffle_buffer))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dropout = CondDropout(DropoutConfig.independent(cfg.label_drop, cfg.control_drop), num_classes, null_text)
        self._it = None

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def skipped(self) -> int:
        """Bad samples skipped so far by this rank's loader (undecodable, missing fields, too small...)."""
        return int(sum(v for k, v in self.loader.stats.items() if k.startswith("skipped_") or k == "shard_errors"))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)
        # DataLoader draws its base seed from the global torch RNG when its iterator starts; fork so
        # that a resumed run (whose iterator starts mid-run) sees the same training RNG stream.
        with torch.random.fork_rng(devices=[]):
            batch = next(self._it)
        return self.dropout(batch)

    def close(self) -> None:
        self._it = None


def merge_positions(states: list[dict]) -> dict:
    """One position for the whole run from every rank's `state_dict()` (slots are disjoint)."""
    from condiff.data.loader import merge_positions as merge_slots

    merged = dict(states[0])
    merged["slots"] = merge_slots([s["slots"] for s in states])
    return merged
