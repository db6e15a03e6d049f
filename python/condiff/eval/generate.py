"""In-memory sample generation for evaluation, split across ranks, deterministic per global sample index.

Sampling rules are `condiff sample`'s (one source of truth, `condiff.sample.resolve`): output and training
resolution, the guidance law (Eq. 4) from the model's base resolution, optional Eq. 3 schedule rescaling,
the sampler's default timestep spacing, and the size-conditioning mode (Table 2b).

Sample i (0 <= i < n) is a pure function of (checkpoint, settings, seed, i), whatever the world size or
batch size (up to float reduction order):
  * initial noise: N(0, I) of shape (C, h, w) from a CPU `torch.Generator` seeded with `seed * 2^32 + i`;
  * condition: prompt `prompts[i % len(prompts)]` (text models) or class `i % num_classes` (class
    models: balanced classes, ADM's protocol);
  * size conditioning phi_l: fixed, the output size, or drawn from the training sizes stored in the
    checkpoint with the same per-index generator (after the noise);
  * DDIM with eta = 0 (the default) is deterministic; with eta > 0 the per-step noise comes from one
    generator per batch seeded with the batch's first index.
Rank r of W takes the indices r, r + W, r + 2W, ... (balanced); results carry their indices so the
gathered lists are put back in global order.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import Tensor

from condiff.conditioning.cond import Cond
from condiff.diffusion import ControlGuidance, get_sampler, spaced_timesteps
from condiff.diffusion.size_cond import full_crop_control_h, inference_control

SIZE_MODES = ("auto", "train-dist", "output", "fixed:H[xW]")


@dataclass
class SamplingSpec:
    """Sampling settings that shape every generated image (all recorded in the manifest)."""

    n: int = 50_000
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 250
    spacing: str | None = None  # None: the sampler's DEFAULT_SPACING (as `condiff sample`)
    eta: float = 0.0
    guidance: float = 1.5  # lambda of Eq. 2 (semantic) at the model's base resolution; 1 = no guidance
    control_guidance: float = 1.0  # beta of Eq. 2 (control); 1 = plain CFG
    size_cond: str = "auto"  # "auto" (train-dist if stored, else output) | "train-dist" | "output" | "fixed:H[xW]"
    resolution: int | None = None  # output pixels; None = the model's training resolution
    guidance_law: bool = True  # Eq. 4 at a resolution other than the base resolution
    guidance_resolution: float | None = None  # resolution `guidance` is tuned at; None: the base resolution
    rescale_schedule: bool = False  # Eq. 3 for the sampling resolution (zero-shot resolution change)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the model forward)
    batch_size: int = 32

    def to_dict(self) -> dict:
        return dict(vars(self))


def parse_size_cond(mode: str) -> tuple[str | None, tuple[float, float] | None]:
    """"fixed:512" -> ("fixed", (512., 512.)); "fixed:384x512" -> (h, w); "auto" -> (None, None) (resolved
    by `condiff.sample.resolve`); "train-dist" / "output" -> (mode, None)."""
    if mode == "auto":
        return None, None
    if mode in ("train-dist", "output"):
        return mode, None
    if mode.startswith("fixed:"):
        parts = mode[6:].lower().split("x")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) in (1, 2) and all(v > 0 for v in vals):
            return "fixed", (vals[0], vals[-1])
    raise ValueError(f"size conditioning {mode!r}: expected one of {SIZE_MODES} (e.g. fixed:512 or fixed:384x512)")


def rank_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Global indices handled by `rank`: rank, rank + W, ... (disjoint, covering range(n) over ranks)."""
    return list(range(rank, n, world_size))


class Generator:
    """Turns global indices into images (B, 3, H, W) in [-1, 1] with one loaded model.

    `inference`: `condiff.train.checkpoint.Inference`. `prompts`: required for text models; for class
    models optional class names, one per class id (the captions of text metrics such as `align`)."""

    def __init__(self, inference, spec: SamplingSpec, prompts: list[str] | None = None, device="cpu"):
        from condiff.sample import Loaded, Settings, resolve

        self.inf, self.spec, self.device = inference, spec, torch.device(device)
        self.model = inference.model
        cfg = dict(self.model.config)
        self.conditioning = cfg.get("conditioning", "class")
        self.has_control = cfg.get("control", "additive") != "none"  # as `condiff sample`
        self.num_classes = int(cfg.get("num_classes", 0))
        mode, fixed = parse_size_cond(spec.size_cond)
        settings = Settings(seed=spec.seed, steps=spec.steps, sampler=spec.sampler, spacing=spec.spacing,
                            eta=spec.eta, guidance=spec.guidance, control_guidance=spec.control_guidance,
                            guidance_law=spec.guidance_law, guidance_resolution=spec.guidance_resolution,
                            rescale_schedule=spec.rescale_schedule, size_cond=mode, orig_size=fixed,
                            resolution=spec.resolution, batch_size=spec.batch_size, precision=spec.precision)
        if spec.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {spec.precision!r}: expected fp32 or bf16")
        if spec.eta and spec.sampler != "ddim":
            raise ValueError(f"--eta applies to ddim only (sampler {spec.sampler!r} is deterministic)")
        r = resolve(Loaded(self.model, inference.schedule, inference.text_encoder, inference.autoencoder,
                           dict(inference.meta)), settings)
        self.resolved = r
        self.channels, self.resolution, self.train_resolution = r["channels"], r["resolution"], r["train_resolution"]
        self.latent_hw = (r["latent_size"], r["latent_size"])
        self.schedule, self.guidance, self.spacing = r["schedule"], r["guidance_effective"], r["spacing"]
        self.size_mode, self.fixed_size, self.size_distribution = r["size_mode"], fixed, r["size_distribution"]
        if self.conditioning == "text":
            if not prompts:
                raise ValueError("a text-conditioned model needs prompts (--prompts FILE or --prompts shapes[:PRESET])")
            if inference.text_encoder is None:
                raise ValueError("the checkpoint is text-conditioned but has no text encoder (meta.json 'text_encoder')")
        elif prompts and len(prompts) != self.num_classes:
            raise ValueError(f"--prompts: {len(prompts)} class names for a model with {self.num_classes} classes "
                             "(class models take one name per class id, used as the caption of its samples)")
        self.prompts = list(prompts) if prompts else None
        self.sampler = get_sampler(spec.sampler)
        self.timesteps = spaced_timesteps(spec.steps, self.schedule.num_timesteps, self.spacing)
        self.null_cond = self._null_cond()

    # ------------------------------------------------------------------ conditions
    def _text_cond(self, prompts: list[str]) -> Cond:
        batch = self.inf.text_encoder.encode(list(prompts))
        pooled = getattr(batch, "pooled", None)
        return Cond(text=batch.states.to(self.device), text_lengths=batch.lengths.to(self.device),
                    pooled=pooled.to(self.device) if pooled is not None else None)

    def _null_cond(self) -> Cond:
        if self.conditioning == "text":
            return self._text_cond([""])
        return Cond(labels=torch.tensor([self.num_classes], device=self.device))

    def caption(self, i: int) -> str | None:
        """The text a sample was asked for (prompt, or class name if given); None if unknown."""
        if self.prompts is None:
            return None
        if self.conditioning == "text":
            return self.prompts[i % len(self.prompts)]
        label = i % self.num_classes
        return self.prompts[label] if label < len(self.prompts) else None

    def index_generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.spec.seed * 2**32 + i)

    def noise(self, i: int) -> Tensor:
        """(C, h, w) initial noise of global sample i."""
        return torch.randn(self.channels, *self.latent_hw, generator=self.index_generator(i))

    def sizes(self, indices: list[int]) -> Tensor:
        """(B, 2) phi_l of the samples (see module docstring)."""
        if self.size_mode == "train-dist":
            rows = []
            for i in indices:
                g = self.index_generator(i)
                torch.randn(self.channels, *self.latent_hw, generator=g)  # the noise comes first
                rows.append(inference_control(1, (self.resolution,) * 2, size_distribution=self.size_distribution,
                                              generator=g)[1])
            return torch.cat(rows)
        _, control_l = inference_control(len(indices), (self.resolution,) * 2, size=self.fixed_size)
        return control_l

    def cond(self, indices: list[int], sizes: Tensor | None = None) -> Cond:
        if self.conditioning == "text":
            cond = self._text_cond([self.prompts[i % len(self.prompts)] for i in indices])
        else:
            cond = Cond(labels=torch.tensor([i % self.num_classes for i in indices], device=self.device))
        if self.has_control:
            control_l = self.sizes(indices) if sizes is None else sizes
            control_h = full_crop_control_h(control_l, (self.resolution, self.resolution))
            cond = replace(cond, control_h=control_h.to(self.device), control_l=control_l.to(self.device))
        return cond

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, first_index: int = 0) -> Tensor:
        """Noise (B, C, h, w) + Cond -> images (B, 3, H, W) float32 in [-1, 1]."""
        model_fn = ControlGuidance(self.model, self.null_cond, lam=self.guidance, beta=self.spec.control_guidance)
        gen = torch.Generator(device=self.device).manual_seed(self.spec.seed * 2**32 + first_index + 2**31)
        options = {"eta": self.spec.eta} if self.spec.sampler == "ddim" else {}
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                    if self.spec.precision == "bf16" else nullcontext())
        with autocast:
            x0 = self.sampler(model_fn, noise.to(self.device), self.timesteps, cond, schedule=self.schedule,
                              generator=gen, **options)
        x0 = x0.float()
        if self.inf.autoencoder is not None:
            x0 = self.inf.autoencoder.decode(x0)
        return x0.float().clamp(-1, 1)

    def images(self, indices: list[int]) -> Tensor:
        noise = torch.stack([self.noise(i) for i in indices])
        return self.sample(noise, self.cond(indices), indices[0])

    def batches(self, rank: int = 0, world_size: int = 1, n: int | None = None) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (global indices, images) for this rank's share of range(n), `spec.batch_size` at a time."""
        mine = rank_indices(self.spec.n if n is None else n, rank, world_size)
        bs = self.spec.batch_size
        for start in range(0, len(mine), bs):
            idx = mine[start:start + bs]
            yield idx, self.images(idx)

    def num_batches(self, rank: int, world_size: int) -> int:
        return math.ceil(len(rank_indices(self.spec.n, rank, world_size)) / self.spec.batch_size)
