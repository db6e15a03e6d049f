"""Atomic, self-describing training checkpoints and inference loading.

Layout of a run directory::

    run_dir/
      latest                  # text file: the name of the newest COMPLETE checkpoint, e.g. "step_00001000"
      step_00001000/
        model.safetensors     # raw (online) weights
        ema.safetensors       # EMA weights (what sampling uses by default)
        phema.safetensors     # power-function EMA profiles (ema.kind=power|both; condiff.train.phema)
        meta.json             # everything needed to rebuild the model and continue the run (see below)
        optim.pt              # optimizer state_dict        (torch.save; read with weights_only=True)
        rng.pt                # per-rank RNG states         (torch.save; read with weights_only=True)

Atomicity (a process killed at any instant never leaves `latest` pointing to a broken checkpoint):
  1. every file is written into a hidden temporary directory `.tmp-step_XXXXXXXX-<pid>/` and fsync'ed;
  2. the temporary directory is renamed to `step_XXXXXXXX/` (a POSIX rename is atomic);
  3. `latest` is rewritten through a temporary file + fsync + `os.replace` (`condiff.io.atomic`);
  4. the run directory is fsync'ed after each rename so the renames survive a power loss.
A kill before (2) leaves only a `.tmp-*` directory, which readers ignore and the next save removes;
a kill between (2) and (3) leaves `latest` on the previous complete checkpoint. `meta.json` is written
last inside the temporary directory, so a directory with a `meta.json` is complete.

meta.json is `CheckpointMeta.to_dict()`; its keys (all JSON):
  step, model (the `model.config` dict: `create(**model)` rebuilds the architecture), schedule
  (`Schedule.to_dict()`, with any Eq. 3 rescaling), text_encoder (its `.config` or null), autoencoder
  (its config or null: null = pixel-space model), base_size (App. C positional grid anchor),
  train_sizes (list of [h, w] original image sizes seen in training, capped; sampling draws size
  conditions from it, Tab. 2b), data_position (per-rank position in the data stream), config (the
  resolved training config), transfer (what `init_from` changed, if anything), format (version),
  world_size, counters, converted_from (`condiff convert`: the source format). Keys written by other
  versions are kept in `CheckpointMeta.extra` and written back unchanged.

Loading never unpickles arbitrary code: weights come from safetensors and the `.pt` files are read
with `torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts only).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from condiff.io.atomic import atomic_write_text, fsync_dir, fsync_file

FORMAT_VERSION = 1
PREFIX = "step_"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRAIN_SIZES_CAP = 4096  # at most this many [h, w] pairs are stored in meta.json


@dataclass
class CheckpointMeta:
    """The typed content of meta.json (the one place its keys are defined)."""

    model: dict[str, Any] | None = None  # `model.config`: `condiff.models.create(**model)` rebuilds it
    schedule: dict[str, Any] | None = None  # `Schedule.to_dict()` (Eq. 3 rescaling included)
    text_encoder: dict[str, Any] | None = None  # `TextEncoder.config`; None: class-conditional
    autoencoder: dict[str, Any] | None = None  # autoencoder config; None: pixel space
    base_size: int | None = None  # App. C positional-grid anchor
    train_sizes: list[list[int]] = field(default_factory=list)  # [h, w] original sizes seen in training (capped)
    data_position: Any = None  # merged `ShardLoader.state_dict()`
    world_size: int = 1
    config: dict[str, Any] | None = None  # the resolved `TrainConfig`
    transfer: dict[str, Any] | None = None  # what `init_from` loaded / dropped / rescaled
    counters: dict[str, Any] = field(default_factory=dict)
    converted_from: dict[str, Any] | None = None  # `condiff convert`: source format and schedule note
    step: int = 0
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "meta") -> "CheckpointMeta":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        for key in ("model", "schedule", "text_encoder", "autoencoder", "config", "transfer"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(f"{where}: {key!r} must be an object or null, got {type(d[key]).__name__}")
        known = {k: v for k, v in d.items() if k in names}
        if known.get("train_sizes") is None:
            known.pop("train_sizes", None)
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _tensors_for_safetensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detach to contiguous CPU tensors; clone entries sharing storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, expected a Tensor")
        t = value.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def is_complete(ckpt_dir: Path) -> bool:
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / "meta.json").is_file() and (ckpt_dir / "model.safetensors").is_file()


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor] | None,
    meta: CheckpointMeta | dict[str, Any],
    optim_state: dict | None = None,
    rng_state: Any = None,
    keep_last: int | None = None,
    extra_weights: dict[str, dict[str, Tensor]] | None = None,
    _fail_after: str | None = None,
) -> Path:
    """Write checkpoint `step_XXXXXXXX` atomically into `run_dir` and point `latest` at it.

    Called on ONE process (rank 0) with full (gathered) state dicts. `meta`: a `CheckpointMeta` (a dict is
    read with `CheckpointMeta.from_dict`); `step` and `format` are set here. `keep_last` deletes older complete
    checkpoints beyond the newest N (None keeps all). `extra_weights` {name: state} adds `name.safetensors` files
    (e.g. the post-hoc EMA profiles, `phema`). `_fail_after` (tests only) raises right after writing the named file, to simulate
    a process killed mid-save. Returns the final checkpoint directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = run_dir / name
    tmp = run_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    for stale in run_dir.glob(f"{TMP_PREFIX}*"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()

    def written(path: Path) -> None:
        fsync_file(path)
        if _fail_after == path.name:
            raise RuntimeError(f"simulated failure after writing {path.name}")

    save_file(_tensors_for_safetensors(model_state), tmp / "model.safetensors", metadata={"format": "pt"})
    written(tmp / "model.safetensors")
    if ema_state is not None:
        save_file(_tensors_for_safetensors(ema_state), tmp / "ema.safetensors", metadata={"format": "pt"})
        written(tmp / "ema.safetensors")
    for extra, state in (extra_weights or {}).items():
        save_file(_tensors_for_safetensors(state), tmp / f"{extra}.safetensors", metadata={"format": "pt"})
        written(tmp / f"{extra}.safetensors")
    if optim_state is not None:
        torch.save(optim_state, tmp / "optim.pt")
        written(tmp / "optim.pt")
    if rng_state is not None:
        torch.save(rng_state, tmp / "rng.pt")
        written(tmp / "rng.pt")
    if isinstance(meta, dict):
        meta = CheckpointMeta.from_dict(meta)
    full_meta = replace(meta, step=int(step), format=FORMAT_VERSION).to_dict()
    with open(tmp / "meta.json", "w") as f:
        json.dump(full_meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    written(tmp / "meta.json")
    fsync_dir(tmp)

    if final.exists():  # re-saving the same step (e.g. final save after a periodic one): swap it out
        trash = run_dir / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(run_dir)
    if _fail_after == "rename":
        raise RuntimeError("simulated failure after the rename, before updating `latest`")
    atomic_write_text(run_dir / LATEST, name + "\n")

    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]) if p.name[len(PREFIX):].isdigit() else -1)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` points at; falls back to the newest complete one if `latest` is missing
    or stale (e.g. the directory was deleted by hand). None when the run has no checkpoint."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text().strip()
        if target.name.startswith(PREFIX) and is_complete(target):
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory or a run directory (-> its latest checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {PREFIX}XXXXXXXX/ with meta.json and "
                                f"model.safetensors, or a `{LATEST}` file pointing at one)")
    raise FileNotFoundError(f"{path}: checkpoint directory does not exist")


def read_meta(ckpt_dir: str | os.PathLike) -> CheckpointMeta:
    path = Path(ckpt_dir) / "meta.json"
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{path}: expected a JSON object with a 'step' key")
    return CheckpointMeta.from_dict(meta, where=str(path))


def load_weights(ckpt_dir: str | os.PathLike, which: str = "ema", device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """State dict from `model.safetensors` (which="model") or `ema.safetensors` (which="ema")."""
    if which not in ("model", "ema"):
        raise ValueError(f"which must be 'model' or 'ema', got {which!r}")
    path = Path(ckpt_dir) / f"{which}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (checkpoint has no {which} weights)")
    return load_file(str(path), device=str(device))


def load_pt(ckpt_dir: str | os.PathLike, name: str) -> Any:
    """Read `optim.pt` / `rng.pt` safely (weights_only: no arbitrary code is unpickled). None if absent."""
    path = Path(ckpt_dir) / name
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model_from_meta(meta: CheckpointMeta, where: str = "meta.json") -> torch.nn.Module:
    """The architecture meta.json describes (`condiff.models.create(**meta.model)`), randomly initialised."""
    from condiff.models import create

    if not meta.model:
        raise ValueError(f"{where}: missing required key 'model'")
    return create(**meta.model)


def load_model(ckpt_dir: str | os.PathLike, which: str = "ema", device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, CheckpointMeta, str]:
    """(model with the checkpoint's weights, in eval mode on `device`, its meta, which weights were loaded).
    which="ema" falls back to the raw weights when the checkpoint has no EMA file."""
    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    model = build_model_from_meta(meta, str(ckpt / "meta.json"))
    which = "ema" if which == "ema" and (ckpt / "ema.safetensors").is_file() else "model"
    missing, unexpected = model.load_state_dict(load_weights(ckpt, which), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / (which + '.safetensors')}: weights do not match the model in meta.json "
                         f"(missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]})")
    return model.to(device).eval().requires_grad_(False), meta, which


def cap_sizes(sizes: list[list[int]], cap: int = TRAIN_SIZES_CAP) -> list[list[int]]:
    """Keep at most `cap` [h, w] pairs, evenly strided (keeps the distribution's shape)."""
    if len(sizes) <= cap:
        return [list(map(int, s)) for s in sizes]
    stride = len(sizes) / cap
    return [list(map(int, sizes[int(i * stride)])) for i in range(cap)]
