"""Initialising a run from another run's checkpoint (`init_from=`): the paper's transfer tricks (Sec. 3.2).

Resolution change (e.g. ImageNet 256 -> 512):
  * positional embeddings: sin-cos grids are resampled, not extrapolated (App. C, Pseudocode 1): the new
    model keeps the SOURCE's `base_size`, so its grid at the new resolution is
    linspace(0, base_size, new_grid), i.e. the same range with a finer step (`models.posemb`). Any stored
    positional table whose shape changed is rebuilt by the new model from that base, never copied.
  * noise schedule: Eq. 3, abar' = s^2 abar / (s'^2 + abar (s^2 - s'^2)), s -> s' the source and target
    pixel resolutions (`Schedule.at_resolution`; a schedule that was already rescaled keeps its
    original base, so 256 -> 512 -> 1024 equals 256 -> 1024).
  * guidance: Eq. 4 (lambda' = 1 + s (lambda - 1)) is a sampling-time rule, `diffusion.guidance`.
Dataset change (e.g. ImageNet-1k class-cond -> CC12M text-cond, or -> ImageNet-22k with more classes):
  every source tensor whose name AND shape match the new model is loaded; the rest is listed (new
  tensors keep their fresh initialisation, e.g. text-conditioning layers; source tensors without a
  counterpart, e.g. the class table, are dropped; same name but different shape, e.g. a 1k-class table
  in a 22k-class model, is reported as a mismatch and re-initialised).
Crops: each stage's recipe sets its own `data.crop` (paper Fig. 8c: local/mix crops in the low-resolution
pre-training help the high-resolution stage); both stages' crops are recorded.

Everything decided here is stored in the new run's checkpoints (meta.json "transfer").
The weights copied are the source's EMA weights (`transfer.use_ema`, default) -- the model one would
sample from -- or its raw weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from condiff.io import checkpoint as ckpt


def match_state(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Split names into loaded (same name and shape), new (only in target), dropped (only in source),
    mismatched (same name, different shape: {name: [source shape, target shape]})."""
    loaded = sorted(k for k in target if k in source and tuple(source[k].shape) == tuple(target[k].shape))
    mismatched = {k: [list(source[k].shape), list(target[k].shape)] for k in sorted(target)
                  if k in source and tuple(source[k].shape) != tuple(target[k].shape)}
    return {"loaded": loaded, "new": sorted(k for k in target if k not in source),
            "dropped": sorted(k for k in source if k not in target), "mismatched": mismatched}


def load_matching(model: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Copy every matching tensor of `source` into `model` (in place); returns `match_state`'s report."""
    target = model.state_dict()
    report = match_state(source, target)
    with torch.no_grad():
        for name in report["loaded"]:
            target[name].copy_(source[name].to(target[name].dtype))
    return report


def transfer_init(cfg, model_kwargs: dict[str, Any], log: Callable[[str], None] = print):
    """Build the new run's model and schedule from `cfg.init_from`. Returns (model, schedule, info)."""
    from condiff.diffusion import Schedule
    from condiff.models import create

    src_dir = ckpt.resolve_checkpoint(cfg.init_from)
    src_meta = ckpt.read_meta(src_dir)
    for key in ("model", "schedule"):
        if not getattr(src_meta, key):
            raise ValueError(f"init_from={cfg.init_from}: {src_dir / 'meta.json'} has no {key!r} entry")
    src_cfg = src_meta.config or {}
    src_res = (src_cfg.get("data") or {}).get("resolution")
    new_res = cfg.data.resolution

    kwargs = dict(model_kwargs)
    base_size = src_meta.base_size
    if cfg.transfer.keep_base_size and base_size is not None and "base_size" not in cfg.model.kwargs:
        kwargs["base_size"] = base_size  # App. C: the grid keeps spanning [0, source grid size]
    model = create(cfg.model.name, conditioning=cfg.model.conditioning, **kwargs)

    which = "ema" if cfg.transfer.use_ema and (src_dir / "ema.safetensors").is_file() else "model"
    report = load_matching(model, ckpt.load_weights(src_dir, which))
    n_src = len(report["loaded"]) + len(report["dropped"]) + len(report["mismatched"])
    log(f"init_from {src_dir} ({which} weights, step {src_meta.step}): loaded {len(report['loaded'])}/{n_src} "
        f"source tensors; new {len(report['new'])}: {_short(report['new'])}; dropped {len(report['dropped'])}: "
        f"{_short(report['dropped'])}; shape-mismatched {len(report['mismatched'])}: {_short(list(report['mismatched']))}")
    if cfg.transfer.strict_shapes and (report["mismatched"] or report["dropped"]):
        raise ValueError(f"transfer.strict_shapes: {len(report['mismatched'])} mismatched and {len(report['dropped'])} "
                         f"dropped source tensors (see the list above); set transfer.strict_shapes=false to allow it")
    if not report["loaded"]:
        raise ValueError(f"init_from={cfg.init_from}: no tensor of the source matches the new model "
                         f"({cfg.model.name}); is it the same backbone?")

    schedule = Schedule.from_dict(src_meta.schedule)
    rescaled = False
    if cfg.transfer.rescale_schedule and src_res and src_res != new_res:
        schedule = schedule.at_resolution(float(new_res), base_resolution=float(src_res))  # Eq. 3
        rescaled = True
        log(f"schedule rescaled for {src_res} -> {new_res} px (Eq. 3): sigma_max "
            f"{Schedule.from_dict(src_meta.schedule).sigma_max:.2f} -> {schedule.sigma_max:.2f}")
    info = {
        "source": str(src_dir),
        "source_step": int(src_meta.step),
        "weights": which,
        "source_model": src_meta.model,
        "resolution": [src_res, new_res],
        "base_size": getattr(model, "base_size", kwargs.get("base_size")),
        "source_base_size": base_size,
        "schedule_rescaled": rescaled,
        "source_schedule": src_meta.schedule,
        "crop": [(src_cfg.get("data") or {}).get("crop"), cfg.data.crop],
        "conditioning": [src_meta.model.get("conditioning"), cfg.model.conditioning],
        **report,
    }
    return model, schedule, info


def _short(names: list[str], n: int = 6) -> str:
    return "[]" if not names else ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")
