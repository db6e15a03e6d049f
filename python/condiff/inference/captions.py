"""The caption set a text checkpoint was trained on, when the run recorded one: shards written by
`condiff make-shards shapes` keep their `dataset.json` (the demo's sits in its run directory,
`runs/demo/data/dataset.json`), from which the exact caption vocabulary follows. Used to note prompts
outside it (they are sampled all the same)."""

from __future__ import annotations

import json
from pathlib import Path

from condiff.io.checkpoint import CheckpointMeta


def training_captions(meta: CheckpointMeta) -> tuple[list[str], Path] | None:
    """(captions, dataset.json path) of the run's training shards, or None when they do not record a
    caption set (not a shapes set, or the shards' folder is not where training found it)."""
    from condiff.data import shapes
    from condiff.io.shards import expand_shards

    shards = ((meta.config or {}).get("data") or {}).get("shards")
    if not shards:
        return None
    try:
        info_path = Path(expand_shards(shards)[0]).parent / "dataset.json"
        info = json.loads(info_path.read_text())
    except (OSError, ValueError, IndexError):
        return None
    if info.get("source") != "shapes" or not isinstance(info.get("config"), dict):
        return None
    return shapes.all_captions(shapes.get_config(info["config"])), info_path


def outside_note(prompts: list[str], meta: CheckpointMeta) -> str | None:
    """One line naming the prompts outside the checkpoint's training captions (None if all inside or
    the checkpoint records no caption set)."""
    known = training_captions(meta)
    if known is None:
        return None
    captions, where = known
    outside = [p for p in dict.fromkeys(prompts) if p not in set(captions)]
    if not outside:
        return None
    return (f"note: {len(outside)} of {len(set(prompts))} prompts are not among the {len(captions)} captions this "
            f"checkpoint was trained on ({where}), sampled anyway: {outside}")
