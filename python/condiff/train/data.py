"""The trainer's view of its data: `condiff.data.ShardLoader` batches, condition dropout, and an exact,
resumable position.

* Batches come from DATA's webdataset reader (`condiff.data.loader.ShardLoader`), split over ranks and
  workers, deterministic given (seed, epoch), with a per-slot position that resumes exactly.
* Condition dropout for guidance happens here, per sample, with two independent draws from the
  rank's torch RNG (whose state is checkpointed): semantic (label -> null class `num_classes`,
  caption -> "" : `Cond`'s null conventions) with probability `label_drop`, and control
  (control_keep -> False) with probability `control_drop` (Eq. 2 needs both nulls).
* The training size distribution (original [h, w] of the samples seen, capped) is collected from the
  batches' `control_l`, so sampling can condition on sizes the model saw (Tab. 2b).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from condiff.train.config import DataConfig


def dataset_info(shards: str) -> dict:
    """`dataset.json` written by `condiff make-shards` next to the shards ({} when absent)."""
    from condiff.data.loader import expand_shards

    try:
        first = Path(expand_shards(shards)[0])
    except (FileNotFoundError, IndexError):
        return {}
    path = first.parent / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def drop_conditions(batch: dict[str, Any], label_drop: float, control_drop: float, num_classes: int,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Per-sample condition dropout (see module docstring). Returns a new batch dict."""
    out = dict(batch)
    n = len(batch["key"]) if "key" in batch else next(len(v) for v in batch.values())
    draws = torch.rand(n, 2, generator=generator)
    drop_sem, drop_ctl = draws[:, 0] < label_drop, draws[:, 1] < control_drop
    if "label" in batch:
        out["label"] = torch.where(drop_sem, torch.full_like(batch["label"], num_classes), batch["label"])
    if "caption" in batch:
        out["caption"] = ["" if d else c for c, d in zip(batch["caption"], drop_sem.tolist())]
    out["control_keep"] = ~drop_ctl
    return out


class TrainStream:
    """Endless batches for one rank with dropout applied; `state_dict()` is this rank's position."""

    def __init__(self, cfg: DataConfig, *, conditioning: str, batch_size: int, rank: int, world_size: int, seed: int,
                 num_classes: int):
        from condiff.data.loader import LoaderConfig, ShardLoader

        if not cfg.shards:
            raise ValueError("data.shards: no shards given (a path, glob, brace pattern or directory of .tar files; "
                             "`condiff make-shards shapes --out DIR` writes a built-in set)")
        self.cfg, self.num_classes = cfg, num_classes
        self.loader = ShardLoader(LoaderConfig(
            shards=cfg.shards, batch_size=batch_size, resolution=cfg.resolution, crop=cfg.crop,
            flip_prob=0.5 if cfg.flip else 0.0, conditioning=conditioning, num_workers=cfg.workers, seed=seed,
            rank=rank, world_size=world_size, shuffle_buffer=cfg.shuffle_buffer))
        self._it = None

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        return drop_conditions(batch, self.cfg.label_drop, self.cfg.control_drop, self.num_classes)

    def close(self) -> None:
        self._it = None


def merge_positions(states: list[dict]) -> dict:
    """One position for the whole run from every rank's `state_dict()` (slots are disjoint)."""
    from condiff.data.loader import merge_positions as merge_slots

    merged = dict(states[0])
    merged["slots"] = merge_slots([s["slots"] for s in states])
    return merged
