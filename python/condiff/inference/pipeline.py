"""`Pipeline`: a model ready to sample, with what it needs around it (schedule, text encoder, autoencoder,
the checkpoint's meta), built from a checkpoint / run directory or from a zoo name with random weights.

The null semantic condition of guidance (Eq. 2) is the null class (labels = num_classes) or the encoding
of "" (`condiff.conditioning.cond`); the null control is `control_keep=False` (added by the guidance).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from condiff.conditioning.cond import Cond
from condiff.diffusion.schedule import Schedule
from condiff.io.checkpoint import CheckpointMeta, load_model, resolve_checkpoint

# the seeded random text encoder zoo text models get (no weights to download)
ZOO_TEXT_ENCODER = {"kind": "tiny-clip", "seed": 0, "dim": 64, "layers": 2, "heads": 2, "max_length": 77}


@dataclass
class Pipeline:
    """model (eval mode), schedule, text_encoder (None: class-conditional), autoencoder (None: pixel
    space), meta (the checkpoint's), source (checkpoint path or "zoo:NAME"), weights ("ema" | "model" |
    "random")."""

    model: torch.nn.Module
    schedule: Schedule
    text_encoder: Any = None
    autoencoder: Any = None
    meta: CheckpointMeta = field(default_factory=CheckpointMeta)
    source: str = ""
    weights: str = "ema"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "ema",
                        autoencoder: str | None = None) -> "Pipeline":
        """Rebuild a trained model from a checkpoint or run directory (-> its latest checkpoint).
        weights "ema" (default; falls back to the raw weights if there is no EMA file) or "model" (raw).
        autoencoder: a local diffusers AutoencoderKL folder replacing the checkpoint's (or supplying a
        missing one, e.g. for a converted checkpoint)."""
        if weights not in ("ema", "model"):
            raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
        ckpt = resolve_checkpoint(path)
        model, meta, which = load_model(ckpt, weights, device)
        if not meta.schedule:
            raise ValueError(f"{ckpt / 'meta.json'}: missing required key 'schedule'")
        text_encoder = ae = None
        if meta.text_encoder:
            from condiff.conditioning.text import build_text_encoder

            text_encoder = _to(build_text_encoder(meta.text_encoder), device)
        if meta.autoencoder:
            from condiff.data.autoencoder import build_autoencoder

            ae = _to(build_autoencoder(meta.autoencoder), device)
        pipe = cls(model, Schedule.from_dict(meta.schedule), text_encoder, ae, meta, str(ckpt), which)
        return pipe.with_autoencoder(autoencoder, device) if autoencoder else pipe

    @classmethod
    def from_zoo(cls, name: str, conditioning: str = "class", device: str | torch.device = "cpu",
                 seed: int = 0) -> "Pipeline":
        """A zoo model with seeded random weights in pixel space (in_channels 3) and the default schedule;
        text models get the seeded tiny-clip text encoder (smoke tests, no download)."""
        from condiff.models import create

        overrides: dict[str, Any] = {"in_channels": 3}
        text_encoder = None
        if conditioning == "text":
            from condiff.conditioning.text import build_text_encoder

            text_encoder = build_text_encoder(ZOO_TEXT_ENCODER)
            overrides.update({"context_dim": text_encoder.dim} if name.startswith("unet")
                             else {"text_dim": text_encoder.dim, "pooled_dim": text_encoder.pooled_dim})
        with torch.random.fork_rng(devices=[]):  # seeded random weights, global RNG untouched
            torch.manual_seed(seed)
            model = create(name, conditioning=conditioning, **overrides)
            if model.config.get("out_channels", 3) != 3:  # UNet configs carry out_channels separately
                torch.manual_seed(seed)
                model = create(name, conditioning=conditioning, **overrides, out_channels=3)
        model.to(device).eval().requires_grad_(False)
        meta = CheckpointMeta(model=model.config, schedule=Schedule().to_dict(),
                              text_encoder=ZOO_TEXT_ENCODER if text_encoder is not None else None)
        return cls(model, Schedule(), text_encoder, None, meta, f"zoo:{name} (random weights)", "random")

    def with_autoencoder(self, path: str, device: str | torch.device = "cpu") -> "Pipeline":
        """Use the diffusers AutoencoderKL folder `path` (meta.autoencoder records it)."""
        from dataclasses import replace

        from condiff.data.autoencoder import build_autoencoder

        ae = _to(build_autoencoder({"kind": "diffusers", "path": path}), device)
        return replace(self, autoencoder=ae, meta=replace(self.meta, autoencoder=ae.config))

    # ------------------------------------------------------------------ properties
    @property
    def conditioning(self) -> str:
        return self.model.config.get("conditioning", "class")

    @property
    def num_classes(self) -> int:
        return int(self.model.config.get("num_classes", 0))

    @property
    def has_control(self) -> bool:
        """False for models built with control "none" (they ignore control metadata)."""
        return self.model.config.get("control", "additive") != "none"

    @property
    def ae_factor(self) -> int:
        """Spatial downsampling of the autoencoder (1 for pixel models)."""
        if self.autoencoder is None:
            return 1
        for name in ("downsample", "downsample_factor"):
            value = getattr(self.autoencoder, name, None)
            if isinstance(value, int) and value >= 1:
                return value
        raise ValueError(f"autoencoder {type(self.autoencoder).__name__} has no integer `downsample_factor`")

    # ------------------------------------------------------------------ conditions
    def semantic_cond(self, items: list, device: str | torch.device = "cpu") -> Cond:
        """One row per item: class ids (class models) or prompts (text models)."""
        if self.conditioning == "text":
            if self.text_encoder is None:
                raise ValueError("the model is text-conditional but has no text encoder (meta.json 'text_encoder')")
            enc = self.text_encoder.encode([str(p) for p in items])
            pooled = getattr(enc, "pooled", None)
            return Cond(text=enc.states, text_lengths=enc.lengths, pooled=pooled).to(device)
        return Cond(labels=torch.tensor([int(c) for c in items], device=device))

    def null_cond(self, device: str | torch.device = "cpu") -> Cond:
        """The null semantic condition, one row."""
        return self.semantic_cond([""] if self.conditioning == "text" else [self.num_classes], device)

    def check_items(self, class_ids: list[int] | None, prompts: list[str] | None) -> list:
        """The rows a user asked for, checked against the model's conditioning."""
        if self.conditioning == "class":
            if prompts:
                raise ValueError("--prompts: this model is class-conditional; give --class-ids")
            if not class_ids:
                raise ValueError("--class-ids: a class-conditional model needs at least one class id")
            bad = [c for c in class_ids if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"--class-ids: {bad} outside [0, {self.num_classes}) "
                                 f"(the model has {self.num_classes} classes)")
            return list(class_ids)
        if class_ids:
            raise ValueError("--class-ids: this model is text-conditional; give --prompts")
        if not prompts:
            raise ValueError("--prompts: a text-conditional model needs at least one prompt")
        if self.text_encoder is None:
            raise ValueError("the checkpoint is text-conditional but has no text encoder (meta.json 'text_encoder')")
        return list(prompts)


def _to(module: Any, device) -> Any:
    return module.to(device) if hasattr(module, "to") else module
