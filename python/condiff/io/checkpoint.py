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
A kill before (2) leaves only a `.tmp-*` directory, which readers ignore and `clean_stale` removes (the
trainer calls it on start, holding the run's `RunLock`);
a kill between (2) and (3) leaves `latest` on the previous complete checkpoint. `meta.json` is written
last inside the temporary directory, so a directory with a `meta.json` is complete.

meta.json is `CheckpointMeta.to_dict()`; its keys (all JSON):
  step, model (the `model.config` dict: `create(**model)` rebuilds the architecture), schedule
  (`Schedule.to_dict()`, with any Eq. 3 rescaling), text_encoder (its `.config` or null), autoencoder
  (its config or null: null = pixel-space model), base_size (App. C positional grid anchor),
  train_sizes (list of [h, w] original image sizes seen in training by every rank, capped; sampling draws size
  conditions from it, Tab. 2b), train_sizes_by_bucket (the same per aspect bucket, capped per bucket:
  {"HxW": [[h, w], ...]}, H x W the model input in image pixels of the bucket the samples were trained at;
  sampling at an output aspect draws from the nearest bucket's list), data_position (per-rank position in the data stream), config (the
  resolved training config), transfer (what `init_from` changed, if anything), format (version),
  world_size, counters, converted_from (`condiff convert`: the source format), files (size in bytes and
  sha256 of every other file of the checkpoint, written at save time; `verify_checkpoint` checks them).
  Keys written by other versions are kept in `CheckpointMeta.extra` and written back unchanged.

Resume (`resumable_checkpoint`) takes the newest checkpoint that verifies: every file it should have is
present (`model.safetensors` plus the caller's list, e.g. optim.pt, rng.pt, ema.safetensors) and matches
the size and hash in meta.json. Newer ones that do not verify are skipped with a reason naming the file.

Loading never unpickles arbitrary code: weights come from safetensors and the `.pt` files are read
with `torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
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
TRASH_PREFIX = ".trash-"
LOCK = ".lock"
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
    # per aspect bucket: {"HxW" (model input, image pixels, `condiff.data.buckets.bucket_key`): [[h, w], ...]}
    train_sizes_by_bucket: dict[str, list[list[int]]] = field(default_factory=dict)
    data_position: Any = None  # merged `ShardLoader.state_dict()`
    world_size: int = 1
    config: dict[str, Any] | None = None  # the resolved `TrainConfig`
    transfer: dict[str, Any] | None = None  # what `init_from` loaded / dropped / rescaled
    counters: dict[str, Any] = field(default_factory=dict)
    converted_from: dict[str, Any] | None = None  # `condiff convert`: source format and schedule note
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # {file name: {"size", "sha256"}} at save time
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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex digest} of one checkpoint file (the `files` entries of meta.json)."""
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


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
    overwrite: bool = False,
    _fail_after: str | None = None,
) -> Path:
    """Write checkpoint `step_XXXXXXXX` atomically into `run_dir` and point `latest` at it.

    Called on ONE process (rank 0) with full (gathered) state dicts. `meta`: a `CheckpointMeta` (a dict is
    read with `CheckpointMeta.from_dict`); `step` and `format` are set here. `keep_last` deletes older complete
    checkpoints beyond the newest N (None keeps all). `extra_weights` {name: state} adds `name.safetensors` files
    (e.g. the post-hoc EMA profiles, `phema`). An existing `step_XXXXXXXX` is an error (FileExistsError)
    unless `overwrite`, which swaps it out atomically. `_fail_after` (tests only) raises right after writing the named file, to simulate
    a process killed mid-save. Returns the final checkpoint directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = run_dir / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: a checkpoint of step {step} already exists; refusing to replace it")
    tmp = run_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():  # a save of this process that failed midway
        shutil.rmtree(tmp)
    tmp.mkdir()

    records: dict[str, dict[str, Any]] = {}

    def written(path: Path) -> None:
        fsync_file(path)
        if path.name != "meta.json":
            records[path.name] = file_record(path)
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
    full_meta = replace(meta, step=int(step), format=FORMAT_VERSION, files=records).to_dict()
    with open(tmp / "meta.json", "w") as f:
        json.dump(full_meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    written(tmp / "meta.json")
    fsync_dir(tmp)

    if final.exists():  # overwrite: swap it out
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
            remove_checkpoint(old)
    return final


def remove_checkpoint(ckpt_dir: Path) -> None:
    """Delete a checkpoint: rename it to a hidden trash name first (readers and `list_checkpoints` stop
    seeing it at once), then delete; a kill mid-delete leaves only trash, which `clean_stale` removes."""
    ckpt_dir = Path(ckpt_dir)
    trash = ckpt_dir.parent / f"{TRASH_PREFIX}{ckpt_dir.name}-{os.getpid()}"
    os.replace(ckpt_dir, trash)
    fsync_dir(ckpt_dir.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of killed saves and deletions (`.tmp-*`, `.trash-*`) from `run_dir`. Call it while
    holding the run's lock (`RunLock`): no other writer can then be mid-save. Returns what was removed."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.glob(".*") if p.name.startswith((TMP_PREFIX, TRASH_PREFIX))] if run_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """Exclusive lock on a run directory: `run_dir/.lock` holds {"pid", "host"} of the holder.

    `acquire()` creates it with O_EXCL; an existing lock is an error naming its holder, unless the holder
    is a dead process on this host (a killed run) or this process, in which case it is taken over."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                    pid, host = int(holder["pid"]), str(holder["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    holder, pid, host = None, -1, self.me["host"]  # unreadable: a writer killed mid-write
                if host == self.me["host"] and (pid == self.me["pid"] or not _pid_alive(pid)):
                    self.path.unlink(missing_ok=True)  # stale (dead holder) or ours: take it over
                    continue
                raise RunDirInUse(f"{self.path}: the run directory is in use by pid {pid} on host {host}; "
                                   f"stop that process (or delete the lock file if it is gone)")
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            return self

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()
        except (OSError, ValueError):
            pass


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


def verify_checkpoint(ckpt_dir: str | os.PathLike, require: tuple[str, ...] = ()) -> list[str]:
    """Problems that make `ckpt_dir` unfit to resume from, each naming its file ([] = verified).

    Checked: meta.json reads; `model.safetensors` and every name in `require` exist; every file recorded
    in meta.json's `files` exists with the recorded size and sha256 (a checkpoint written before the
    records existed is checked for presence only)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = read_meta(ckpt_dir)
    except (OSError, ValueError) as e:
        return [f"{ckpt_dir / 'meta.json'}: unreadable ({e})"]
    problems = [f"{ckpt_dir / name}: missing" for name in ("model.safetensors", *require)
                if name not in meta.files and not (ckpt_dir / name).is_file()]
    for name, rec in meta.files.items():
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != rec.get("size"):
            problems.append(f"{path}: corrupt ({path.stat().st_size} bytes, meta.json records {rec.get('size')})")
        elif _sha256(path) != rec.get("sha256"):
            problems.append(f"{path}: corrupt (sha256 differs from the one meta.json records)")
    return problems


def resumable_checkpoint(run_dir: str | os.PathLike, require: tuple[str, ...] = ()
                         ) -> tuple[Path | None, dict[Path, list[str]]]:
    """(the newest checkpoint of `run_dir` that verifies, {newer checkpoint skipped: its problems}).

    Candidates are `latest` and the complete `step_*` directories, newest first. (None, {...}) when none
    verifies: the caller decides whether to fail or to resume partially from the newest one."""
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)[::-1]
    pointed = latest_checkpoint(run_dir)
    if pointed is not None and pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    skipped: dict[Path, list[str]] = {}
    for cand in candidates:
        problems = verify_checkpoint(cand, require)
        if not problems:
            return cand, skipped
        skipped[cand] = problems
    return None, skipped


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
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path}: cannot read the weights (corrupt or truncated safetensors file: {e})") from e


def load_pt(ckpt_dir: str | os.PathLike, name: str) -> Any:
    """Read `optim.pt` / `rng.pt` safely (weights_only: no arbitrary code is unpickled). None if absent."""
    path = Path(ckpt_dir) / name
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, or a pickle that weights_only refuses
        raise ValueError(f"{path}: cannot read ({e})") from e


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
