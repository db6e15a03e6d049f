"""The sampling specification and the one place its defaults are resolved against a model.

Guidance (Eq. 2 and Eq. 4): `guidance` is lambda at `guidance_resolution`, which defaults to the model's
BASE resolution (`condiff.diffusion.guidance.guidance_base_resolution`: the schedule's Eq. 3 base, else
the positional-grid anchor, else the training resolution). At any other output resolution the lambda
actually used is Eq. 4's lambda'(s) = 1 + s (lambda - 1), s = output / guidance_resolution, unless
`guidance_law` is False (then lambda is used as given). For a non-square H x W output s is the pixel-count
scale sqrt(H W) / guidance_resolution (`guidance.resolution_scale`). `Resolved.guidance` is the lambda
actually used; every record (grid JSON, eval manifest) writes it.

Output shape: `size` (H, W) pixels (any positive multiple of the autoencoder factor x the model's patch,
or of the UNet's downsample factor) or `resolution` (square); neither: the training resolution.
`Resolved.resolution` is the side of the square with the output's pixel count (Eq. 3 and Eq. 4 read it).
Mixed aspects (`aspects`, eval presets): sample i is drawn at aspects[i % k] (W / H) with the output's pixel
count, each shape resolved on its own (`resolve_shapes`: its lambda by Eq. 4, its size bucket).

Size conditioning phi_l (Table 2b), one syntax for every command and config (`parse_size_cond`):
  auto            train-dist when the checkpoint stores training sizes, else output (the default)
  train-dist      drawn from the training sizes stored in the checkpoint (a per-bucket distribution: from
                  the bucket whose aspect is nearest the output's, `condiff.diffusion.size_cond`)
  output          the output size
  fixed:H[xW]     one size for every sample, e.g. fixed:512 or fixed:384x512
  uniform:LO-HI   square sizes s ~ U([LO, HI]), e.g. uniform:512-1024 (Table 2b)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from condiff.diffusion.guidance import guidance_base_resolution, guidance_scale_for_resolution, resolution_scale
from condiff.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, SPACINGS, spaced_timesteps
from condiff.diffusion.schedule import Schedule
from condiff.diffusion.size_cond import size_distribution_from_meta, sizes_for_output

SIZE_COND_SYNTAX = "auto | train-dist | output | fixed:H[xW] | uniform:LO-HI"
PRECISIONS = ("fp32", "bf16")
DEFAULT_GUIDANCE = 1.5  # lambda at the base resolution: the paper's FID setting at 256 px (App. B)


@dataclass
class SamplingSpec:
    """Everything that shapes a generated image (recorded with every grid and manifest)."""

    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    spacing: str | None = None  # None: the sampler's DEFAULT_SPACING
    eta: float = 0.0  # DDIM only
    guidance: float = DEFAULT_GUIDANCE  # lambda of Eq. 2 at `guidance_resolution`; 1 = no guidance
    guidance_resolution: float | None = None  # pixels lambda is given at; None: the model's base resolution
    guidance_law: bool = True  # Eq. 4 at an output resolution other than guidance_resolution
    control_guidance: float = 1.0  # beta of Eq. 2; 1 = plain CFG
    size_cond: str = "auto"  # SIZE_COND_SYNTAX
    flip: int = 0  # phi_h's flip field (Table 2c): 1 asks a flip-conditioned model for the mirrored image
    resolution: int | None = None  # output pixels (square); None: the training resolution
    size: tuple[int, int] | None = None  # output (H, W) pixels, any aspect; exclusive with resolution
    aspects: tuple[float, ...] | None = None  # mixed aspects: sample i at aspects[i % k] (W / H), `resolve_shapes`
    rescale_schedule: bool = False  # Eq. 3 for the sampling resolution (zero-shot resolution change)
    batch_size: int = 16
    precision: str = "fp32"  # fp32 | bf16 (autocast of the model forward)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SizeCond:
    """A parsed size-conditioning mode; `size` for fixed, `range` for uniform."""

    mode: str  # auto | train-dist | output | fixed | uniform
    size: tuple[float, float] | None = None
    range: tuple[float, float] | None = None

    def __str__(self) -> str:
        if self.mode == "fixed":
            h, w = self.size
            return f"fixed:{h:g}" if h == w else f"fixed:{h:g}x{w:g}"
        if self.mode == "uniform":
            return f"uniform:{self.range[0]:g}-{self.range[1]:g}"
        return self.mode


def parse_size_cond(text: str, where: str = "size conditioning") -> SizeCond:
    """Parse SIZE_COND_SYNTAX; a ValueError names `where` and the accepted forms."""
    text = str(text).strip().lower()
    if text in ("auto", "train-dist", "output"):
        return SizeCond(text)
    kind, _, arg = text.partition(":")
    try:
        if kind == "fixed":
            vals = [float(v) for v in arg.split("x")]
            if len(vals) in (1, 2) and all(v > 0 for v in vals):
                return SizeCond("fixed", size=(vals[0], vals[-1]))
        elif kind == "uniform":
            lo, hi = (float(v) for v in arg.split("-"))
            if 0 < lo <= hi:
                return SizeCond("uniform", range=(lo, hi))
    except ValueError:
        pass
    raise ValueError(f"{where} {text!r}: expected {SIZE_COND_SYNTAX} (e.g. fixed:512, fixed:384x512, uniform:512-1024)")


@dataclass
class Resolved:
    """A spec resolved against one pipeline: what sampling actually runs."""

    channels: int
    ae_factor: int
    train_resolution: int
    size: tuple[int, int]  # output (H, W) pixels
    aspect: float  # W / H of the output: phi_h's aspect_ratio
    resolution: float  # sqrt(H W): the side of the square with the output's pixel count (the int H if square)
    latent_hw: tuple[int, int]  # (h, w) of the sampled latent (or pixel) grid
    guidance_given: float  # the spec's lambda, at guidance_resolution
    guidance_resolution: float
    guidance_scale_s: float  # s of Eq. 4
    guidance: float  # the lambda actually used (Eq. 4 applied)
    schedule: Schedule
    spacing: str
    timesteps: torch.Tensor  # (steps,) strictly decreasing
    size_cond: SizeCond  # never "auto"
    size_distribution: list[list[float]] | None  # for train-dist: the list drawn from
    size_bucket: str | None  # train-dist with a per-bucket distribution: the "HxW" bucket drawn from

    def to_record(self) -> dict[str, Any]:
        """JSON-able record (the schedule as its dict, timesteps as a list)."""
        out = {k: v for k, v in vars(self).items() if k not in ("schedule", "timesteps", "size_cond", "size_distribution")}
        out.update(size=list(self.size), latent_hw=list(self.latent_hw))
        return {**out, "size_cond": str(self.size_cond), "schedule": self.schedule.to_dict(),
                "timesteps": self.timesteps.tolist()}


def resolve(pipeline, spec: SamplingSpec) -> Resolved:
    """Resolve `spec` against `pipeline` (`condiff.inference.pipeline.Pipeline`); every bad value raises a
    ValueError naming the setting."""
    cfg = pipeline.model.config
    factor = pipeline.ae_factor
    channels = int(cfg.get("in_channels", 3))
    if pipeline.autoencoder is None and channels != 3:
        raise ValueError(f"the model has {channels} input channels but no autoencoder to decode them "
                         "(meta.json 'autoencoder' is null, e.g. a converted checkpoint): give --autoencoder DIR "
                         "(a local diffusers AutoencoderKL folder)")
    train_res = int(cfg.get("input_size", 32)) * factor
    H, W = output_size(pipeline, spec, train_res)
    if spec.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {spec.sampler!r}: choose one of {sorted(SAMPLERS)}")
    if spec.spacing is not None and spec.spacing not in SPACINGS:
        raise ValueError(f"--spacing {spec.spacing!r}: choose one of {SPACINGS}")
    if spec.eta and spec.sampler != "ddim":
        raise ValueError(f"--eta applies to ddim only (sampler {spec.sampler!r} is deterministic)")
    if spec.precision not in PRECISIONS:
        raise ValueError(f"--precision {spec.precision!r}: expected one of {PRECISIONS}")
    if spec.flip not in (0, 1):
        raise ValueError(f"--flip {spec.flip!r}: expected 0 (as captioned) or 1 (mirrored; Table 2c)")
    if spec.steps < 1 or spec.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    guidance_res = float(spec.guidance_resolution or guidance_base_resolution(pipeline.schedule.config, cfg, factor))
    if not guidance_res > 0:
        raise ValueError(f"--guidance-resolution must be > 0, got {spec.guidance_resolution}")
    res = H if H == W else (H * W) ** 0.5  # the pixel-count side
    s = resolution_scale((H, W), (guidance_res, guidance_res))
    lam = guidance_scale_for_resolution(spec.guidance, s) if (spec.guidance_law and s != 1) else float(spec.guidance)
    schedule = pipeline.schedule
    if spec.rescale_schedule and res != train_res:
        schedule = schedule.at_resolution(res, base_resolution=None if schedule.config.base_resolution else train_res)
    spacing = spec.spacing or DEFAULT_SPACING[spec.sampler]
    sizes = size_distribution_from_meta(pipeline.meta.to_dict())
    size_cond = parse_size_cond(spec.size_cond, "--size-cond")
    if size_cond.mode == "auto":
        size_cond = SizeCond("train-dist" if sizes else "output")
    if size_cond.mode == "train-dist" and not sizes:
        raise ValueError("--size-cond train-dist: the checkpoint stores no training sizes (meta.json 'train_sizes')")
    drawn, bucket = sizes_for_output(sizes, (H, W)) if size_cond.mode == "train-dist" else (None, None)
    return Resolved(channels=channels, ae_factor=factor, train_resolution=train_res, size=(H, W), aspect=W / H,
                    resolution=res, latent_hw=(H // factor, W // factor), guidance_given=float(spec.guidance),
                    guidance_resolution=guidance_res, guidance_scale_s=s, guidance=lam, schedule=schedule,
                    spacing=spacing, timesteps=spaced_timesteps(spec.steps, schedule.num_timesteps, spacing),
                    size_cond=size_cond, size_distribution=drawn, size_bucket=bucket)


def resolve_shapes(pipeline, spec: SamplingSpec) -> list[Resolved]:
    """One `Resolved` per output shape: [resolve(spec)], or with `spec.aspects` one per aspect a = W / H, of
    about the same pixel count as the output (H, W) = (R / sqrt(a), R sqrt(a)), R = the output's pixel-count
    side, each side rounded to the nearest positive multiple of the autoencoder factor x patch."""
    base = resolve(pipeline, spec)
    if not spec.aspects:
        return [base]
    step = base.ae_factor * shape_multiple(pipeline)
    shapes = []
    for a in spec.aspects:
        if not (isinstance(a, (int, float)) and 0 < a < float("inf")):
            raise ValueError(f"--aspects: each aspect (width / height) must be a positive number, got {a!r}")
        h = max(step, step * round(base.resolution / a ** 0.5 / step))
        w = max(step, step * round(base.resolution * a ** 0.5 / step))
        shapes.append(resolve(pipeline, replace(spec, size=(h, w), resolution=None, aspects=None)))
    return shapes


def shape_multiple(pipeline) -> int:
    """What a latent side must be a multiple of: the model's patch size (the UNet: its downsample factor)."""
    return int(getattr(pipeline.model, "downsample_factor", None) or pipeline.model.config.get("patch_size", 1))


def output_size(pipeline, spec: SamplingSpec, train_res: int) -> tuple[int, int]:
    """The output (H, W) in pixels from `spec.size` / `spec.resolution` (default: train_res square); each side
    a positive multiple of the autoencoder factor whose latent side is a multiple of the model's patch (the
    UNet: its downsample factor). A ValueError names the flag."""
    if spec.size is not None and spec.resolution is not None:
        raise ValueError(f"--size {spec.size} and --resolution {spec.resolution}: give one of them")
    if spec.size is not None:
        if len(spec.size) != 2:
            raise ValueError(f"--size: expected H W, got {spec.size!r}")
        flag, (H, W) = "--size", (int(v) for v in spec.size)
    else:
        flag, H = "--resolution", int(spec.resolution or train_res)
        W = H
    factor, patch = pipeline.ae_factor, shape_multiple(pipeline)
    for side in (H, W):
        if side <= 0 or side % factor:
            raise ValueError(f"{flag} {side}: must be a positive multiple of the autoencoder factor {factor}")
        if (side // factor) % patch:
            raise ValueError(f"{flag} {side}: the latent side {side // factor} must be a multiple of the "
                             f"patch size {patch} (any multiple of {factor * patch} px)")
    return H, W
