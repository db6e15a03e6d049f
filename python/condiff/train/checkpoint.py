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
  3. `latest` is rewritten through `latest.tmp` + fsync + `os.replace` (atomic too);
  4. the run directory is fsync'ed after each rename so the renames survive a power loss.
A kill before (2) leaves only a `.tmp-*` directory, which readers ignore and the next save removes;
a kill between (2) and (3) leaves `latest` on the previous complete checkpoint. `meta.json` is written
last inside the temporary directory, so a directory with a `meta.json` is complete.

meta.json keys (all JSON):
  step, model (the `model.config` dict: `create(**model)` rebuilds the architecture), schedule
  (`Schedule.to_dict()`, with any Eq. 3 rescaling), text_encoder (its `.config` or null), autoencoder
  (its config or null: null = pixel-space model), base_size (App. C positional grid anchor),
  train_sizes (list of [h, w] original image sizes seen in training, capped; sampling draws size
  conditions from it, Tab. 2b), data_position (per-rank position in the data stream), config (the
  resolved training config), transfer (what `init_from` changed, if anything), format (version).

Loading never unpickles arbitrary code: weights come from safetensors and the `.pt` files are read
with `torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts only).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT_VERSION = 1
PREFIX = "step_"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRAIN_SIZES_CAP = 4096  # at most this many [h, w] pairs are stored in meta.json


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    meta: dict[str, Any],
    optim_state: dict | None = None,
    rng_state: Any = None,
    keep_last: int | None = None,
    extra_weights: dict[str, dict[str, Tensor]] | None = None,
    _fail_after: str | None = None,
) -> Path:
    """Write checkpoint `step_XXXXXXXX` atomically into `run_dir` and point `latest` at it.

    Called on ONE process (rank 0) with full (gathered) state dicts. `meta` must be JSON-serialisable;
    `step` and `format` are added. `keep_last` deletes older complete checkpoints beyond the newest N
    (None keeps all). `extra_weights` {name: state} adds `name.safetensors` files (e.g. the post-hoc
    EMA profiles, `phema`). `_fail_after` (tests only) raises right after writing the named file, to simulate
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
        _fsync_file(path)
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
    full_meta = {"format": FORMAT_VERSION, **meta, "step": int(step)}
    with open(tmp / "meta.json", "w") as f:
        json.dump(full_meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    written(tmp / "meta.json")
    _fsync_dir(tmp)

    if final.exists():  # re-saving the same step (e.g. final save after a periodic one): swap it out
        trash = run_dir / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(run_dir)
    if _fail_after == "rename":
        raise RuntimeError("simulated failure after the rename, before updating `latest`")
    _write_text_atomic(run_dir / LATEST, name + "\n")

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


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / "meta.json"
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{path}: expected a JSON object with a 'step' key")
    return meta


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


@dataclass
class Inference:
    """What sampling and evaluation need from a run. text_encoder / autoencoder are None for class-
    conditional and pixel-space models respectively."""

    model: torch.nn.Module
    schedule: Any  # condiff.diffusion.Schedule
    text_encoder: Any
    autoencoder: Any
    meta: dict[str, Any]


def build_model_from_meta(meta: dict[str, Any]) -> torch.nn.Module:
    from condiff.models import create

    cfg = dict(meta["model"])
    return create(**cfg)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True) -> Inference:
    """Rebuild a trained model for sampling/evaluation from a checkpoint or run directory.

    use_ema=True loads the EMA weights (the default for sampling); falls back to the raw weights only
    if the checkpoint has no EMA file. The model is returned in eval mode on `device`.
    """
    from condiff.diffusion import Schedule

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    for key in ("model", "schedule"):
        if key not in meta:
            raise ValueError(f"{ckpt / 'meta.json'}: missing required key {key!r}")
    model = build_model_from_meta(meta)
    which = "ema" if use_ema and (ckpt / "ema.safetensors").is_file() else "model"
    state = load_weights(ckpt, which)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / (which + '.safetensors')}: weights do not match the model in meta.json "
                         f"(missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]})")
    model.to(device).eval().requires_grad_(False)
    schedule = Schedule.from_dict(meta["schedule"])
    text_encoder = None
    if meta.get("text_encoder"):
        from condiff.conditioning.text import build_text_encoder

        text_encoder = build_text_encoder(meta["text_encoder"])
        if hasattr(text_encoder, "to"):
            text_encoder = text_encoder.to(device)
    autoencoder = None
    if meta.get("autoencoder"):
        from condiff.data.autoencoder import build_autoencoder

        autoencoder = build_autoencoder(meta["autoencoder"])
        if hasattr(autoencoder, "to"):
            autoencoder = autoencoder.to(device)
    meta = dict(meta, weights=which, checkpoint=str(ckpt))
    return Inference(model=model, schedule=schedule, text_encoder=text_encoder, autoencoder=autoencoder, meta=meta)


def cap_sizes(sizes: list[list[int]], cap: int = TRAIN_SIZES_CAP) -> list[list[int]]:
    """Keep at most `cap` [h, w] pairs, evenly strided (keeps the distribution's shape)."""
    if len(sizes) <= cap:
        return [list(map(int, s)) for s in sizes]
    stride = len(sizes) / cap
    return [list(map(int, sizes[int(i * stride)])) for i in range(cap)]
