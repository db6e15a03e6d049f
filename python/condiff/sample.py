"""`condiff sample`: a PNG grid from a trained checkpoint, or from a zoo model with random weights (smoke tests).

    condiff sample --checkpoint runs/imagenet256 --class-ids 207 360 387 --n-per-cond 4 --guidance 1.5
    condiff sample --checkpoint runs/cc12m --prompts "a corgi on a beach" --resolution 512
    condiff sample --model dit-tiny --class-ids 1 2 3            # random weights, pixel space, 32 px

What it does, in order (every choice is written next to the PNG in `<out>.json`):
  1. model: `load_for_inference(checkpoint, device, use_ema=True)` (EMA weights, the checkpoint's schedule,
     text encoder and autoencoder), or `condiff.models.create(name)` with random weights in pixel space
     (in_channels 3, no autoencoder; text models use the seeded "tiny-clip" text encoder).
  2. conditions: each class id / prompt repeated `--n-per-cond` times; the null semantic condition of
     guidance is the null class (labels = num_classes) or the encoding of "" (see condiff.conditioning.cond).
  3. size conditioning (Table 2b): phi_l drawn from the training sizes stored in the checkpoint
     ("train-dist", the default when available), the output size ("output"), or fixed ("--orig-size H W");
     phi_h is a full centred un-flipped crop (condiff.diffusion.size_cond).
  4. guidance: Eq. 2 with lambda = --guidance and beta = --control-guidance in one batched forward.
     --guidance is the lambda at the model's BASE resolution (where the paper tunes it: 1.5 at 256 px);
     at any other output resolution it follows the guidance law lambda'(s) = 1 + s (lambda - 1)
     (Eq. 4, s = output / base resolution) unless --no-guidance-law. Base resolution (`guidance_base_resolution`):
     --guidance-resolution if given, else the schedule's Eq. 3 base (a 256 -> 512 fine-tune: 256),
     else the positional-grid anchor base_size x patch x autoencoder factor (App. C; a fine-tune that
     kept its base size: 256), else the training resolution. So a 512 px fine-tune of a 256 px model
     sampled at 512 px with --guidance 1.5 uses 2.0, the paper's 512 px setting.
     The schedule is the checkpoint's (what training used, Eq. 3 rescaling included); --rescale-schedule
     additionally applies Eq. 3 for the sampling resolution (zero-shot resolution change).
  5. sampler (--sampler ddim | dpmpp-2m | heun) over `--steps` timesteps, with a tqdm progress bar;
     decoding through the autoencoder (latent models) or identity (pixel models); the grid is written.
Determinism: all initial noise and size draws come from one CPU generator seeded with --seed, in sample
order, and stochastic samplers get one generator per batch seeded from it, so the same seed and settings
give the same PNG (bit-exact on the same machine and device).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from condiff.conditioning.cond import Cond
from condiff.diffusion.guidance import (ControlGuidance, guidance_base_resolution, guidance_scale_for_resolution,
                                       guidance_weight_arg)
from condiff.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, SPACINGS, get_sampler, spaced_timesteps
from condiff.diffusion.schedule import Schedule
from condiff.diffusion.size_cond import inference_control, size_distribution_from_meta

ZOO_TEXT_ENCODER = {"kind": "tiny-clip", "seed": 0, "dim": 64, "layers": 2, "heads": 2, "max_length": 77}
SIZE_MODES = ("train-dist", "output", "fixed")


@dataclass
class Loaded:
    """A model ready to sample (what `load_for_inference` returns, or a random zoo model)."""

    model: torch.nn.Module
    schedule: Schedule
    text_encoder: Any
    autoencoder: Any
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ loading
def autoencoder_factor(autoencoder: Any) -> int:
    """Spatial downsampling of the autoencoder (1 for pixel models)."""
    if autoencoder is None:
        return 1
    for name in ("downsample", "downsample_factor"):
        value = getattr(autoencoder, name, None)
        if isinstance(value, int) and value >= 1:
            return value
    raise ValueError(f"autoencoder {type(autoencoder).__name__} has no integer `downsample_factor`")


def load_zoo(name: str, conditioning: str, device: str, seed: int = 0) -> Loaded:
    """A zoo model with random weights in pixel space (in_channels 3), the paper's default schedule."""
    from condiff.models import create

    overrides: dict[str, Any] = {"in_channels": 3}
    text_encoder = None
    if conditioning == "text":
        from condiff.conditioning.text import build_text_encoder

        text_encoder = build_text_encoder(ZOO_TEXT_ENCODER)
        dims = ({"context_dim": text_encoder.dim} if name.startswith("unet")
                else {"text_dim": text_encoder.dim, "pooled_dim": text_encoder.pooled_dim})
        overrides.update(dims)
    with torch.random.fork_rng(devices=[]):  # seeded random weights, global RNG untouched
        torch.manual_seed(seed)
        model = create(name, conditioning=conditioning, **overrides)
        if model.config.get("out_channels", 3) != 3:  # UNet configs carry out_channels separately
            torch.manual_seed(seed)
            model = create(name, conditioning=conditioning, **overrides, out_channels=3)
    model.to(device).eval().requires_grad_(False)
    meta = {"model": model.config, "schedule": Schedule().to_dict(), "text_encoder": ZOO_TEXT_ENCODER
            if text_encoder is not None else None, "autoencoder": None, "random_weights": True}
    return Loaded(model, Schedule(), text_encoder, None, meta)


def load_checkpoint(path: str, device: str, use_ema: bool = True) -> Loaded:
    from condiff.train.checkpoint import load_for_inference

    inf = load_for_inference(path, device=device, use_ema=use_ema)
    return Loaded(inf.model, inf.schedule, inf.text_encoder, inf.autoencoder, dict(inf.meta))


# ------------------------------------------------------------------------------------------ conditions
def semantic_conditions(loaded: Loaded, class_ids: list[int] | None, prompts: list[str] | None,
                        n_per: int) -> tuple[Cond, Cond, list[str]]:
    """(cond with N = len(ids or prompts) * n_per rows, null semantic cond (1 row), captions)."""
    cfg = loaded.model.config
    conditioning = cfg.get("conditioning", "class")
    if conditioning == "class":
        if prompts:
            raise ValueError("--prompts: this model is class-conditional; give --class-ids")
        if not class_ids:
            raise ValueError("--class-ids: a class-conditional model needs at least one class id")
        num_classes = int(cfg["num_classes"])
        bad = [c for c in class_ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--class-ids: {bad} outside [0, {num_classes}) (the model has {num_classes} classes)")
        labels = torch.tensor([c for c in class_ids for _ in range(n_per)])
        return Cond(labels=labels), Cond(labels=torch.tensor([num_classes])), [f"class {c}" for c in labels.tolist()]
    if class_ids:
        raise ValueError("--class-ids: this model is text-conditional; give --prompts")
    if not prompts:
        raise ValueError("--prompts: a text-conditional model needs at least one prompt")
    if loaded.text_encoder is None:
        raise ValueError("the checkpoint is text-conditional but has no text encoder (meta.json 'text_encoder')")
    rows = [p for p in prompts for _ in range(n_per)]
    enc, null = loaded.text_encoder.encode(rows), loaded.text_encoder.encode([""])
    cond = Cond(text=enc.states, text_lengths=enc.lengths, pooled=enc.pooled)
    return cond, Cond(text=null.states, text_lengths=null.lengths, pooled=null.pooled), rows


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class Settings:
    seed: int = 0
    steps: int = 50
    sampler: str = "ddim"
    spacing: str | None = None  # None: DEFAULT_SPACING[sampler]
    eta: float = 0.0
    guidance: float = 4.0  # lambda (Eq. 2); 1 = no guidance
    control_guidance: float = 1.0  # beta (Eq. 2); 1 = plain CFG
    guidance_law: bool = True  # Eq. 4 at a resolution other than the base resolution
    guidance_resolution: float | None = None  # resolution `guidance` is tuned at; None: guidance_base_resolution()
    rescale_schedule: bool = False  # Eq. 3 for the sampling resolution
    size_cond: str | None = None  # None: "train-dist" if the checkpoint has sizes, else "output"
    orig_size: tuple[float, float] | None = None  # for size_cond "fixed"
    resolution: int | None = None  # output pixels (square); None: the training resolution
    batch_size: int = 16
    precision: str = "fp32"  # fp32 | bf16 (autocast of the model forward)


def resolve(loaded: Loaded, s: Settings) -> dict[str, Any]:
    """Everything derived from the model and the settings (recorded in the JSON sidecar)."""
    cfg = loaded.model.config
    factor = autoencoder_factor(loaded.autoencoder)
    channels = int(cfg.get("in_channels", 3))
    if loaded.autoencoder is None and channels != 3:
        raise ValueError(f"the model has {channels} input channels but no autoencoder to decode them "
                         "(meta.json 'autoencoder' is null, e.g. a converted checkpoint): give --autoencoder DIR "
                         "(a local diffusers AutoencoderKL folder)")
    train_res = int(cfg.get("input_size", 32)) * factor
    res = int(s.resolution or train_res)
    if res <= 0 or res % factor:
        raise ValueError(f"--resolution {res}: must be a positive multiple of the autoencoder factor {factor}")
    patch = int(cfg.get("patch_size", 1))
    if (res // factor) % patch:
        raise ValueError(f"--resolution {res}: the latent size {res // factor} must be a multiple of the "
                         f"patch size {patch}")
    guidance_res = float(s.guidance_resolution or guidance_base_resolution(loaded.schedule.config, cfg, factor))
    if not guidance_res > 0:
        raise ValueError(f"--guidance-resolution must be > 0, got {s.guidance_resolution}")
    g_scale = res / guidance_res
    lam = guidance_scale_for_resolution(s.guidance, g_scale) if (s.guidance_law and g_scale != 1) else s.guidance
    scale = res / train_res
    schedule = loaded.schedule
    if s.rescale_schedule and scale != 1:
        schedule = schedule.at_resolution(res, base_resolution=None if schedule.config.base_resolution else train_res)
    if s.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {s.sampler!r}: choose one of {sorted(SAMPLERS)}")
    spacing = s.spacing or DEFAULT_SPACING[s.sampler]
    sizes = size_distribution_from_meta(loaded.meta)
    mode = s.size_cond or ("fixed" if s.orig_size else ("train-dist" if sizes else "output"))
    if mode not in SIZE_MODES:
        raise ValueError(f"--size-cond {mode!r}: choose one of {SIZE_MODES}")
    if mode == "train-dist" and not sizes:
        raise ValueError("--size-cond train-dist: the checkpoint stores no training sizes (meta.json 'train_sizes')")
    if mode == "fixed" and not s.orig_size:
        raise ValueError("--size-cond fixed needs --orig-size H [W]")
    return dict(channels=channels, factor=factor, train_resolution=train_res, resolution=res,
                latent_size=res // factor, resolution_scale=scale, guidance_resolution=guidance_res,
                guidance_scale_s=g_scale, guidance_effective=lam, schedule=schedule,
                spacing=spacing, size_mode=mode, size_distribution=sizes if mode == "train-dist" else None)


@torch.no_grad()
def generate(loaded: Loaded, cond: Cond, null: Cond, s: Settings, device: str = "cpu",
             progress: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """Images (N, 3, H, W) in [-1, 1] on the CPU, and the resolved settings."""
    r = resolve(loaded, s)
    n, h = cond.batch_size, r["latent_size"]
    gen = torch.Generator().manual_seed(s.seed)
    x_T = torch.randn(n, r["channels"], h, h, generator=gen)  # (N, C, h, w), sample order
    size = tuple(s.orig_size) if r["size_mode"] == "fixed" else None
    control_h, control_l = inference_control(n, (r["resolution"], r["resolution"]), size=size,
                                             size_distribution=r["size_distribution"], generator=gen)
    batch_seeds = torch.randint(0, 2**62, (math.ceil(n / s.batch_size),), generator=gen).tolist()
    uses_control = loaded.model.config.get("control", "additive") != "none"
    if uses_control:  # (a model with control "none" ignores it; leaving it out also skips the eps(0,s) row)
        cond = Cond(**{**cond._tensors(), "control_h": control_h, "control_l": control_l})
    sampler = get_sampler(s.sampler)
    ts = spaced_timesteps(s.steps, r["schedule"].num_timesteps, r["spacing"])
    options = {"eta": s.eta} if s.sampler == "ddim" else {}
    if s.eta and s.sampler != "ddim":
        raise ValueError(f"--eta applies to ddim only (sampler {s.sampler!r} is deterministic)")
    model_fn = ControlGuidance(loaded.model, null.to(device), lam=r["guidance_effective"], beta=s.control_guidance)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                if s.precision == "bf16" else nullcontext())
    out = []
    bar = _progress(len(batch_seeds) * len(ts), progress)
    for b, start in enumerate(range(0, n, s.batch_size)):
        rows = slice(start, min(start + s.batch_size, n))
        with autocast:
            x0 = sampler(model_fn, x_T[rows].to(device), ts, cond.index(rows).to(device), schedule=r["schedule"],
                         generator=torch.Generator(device).manual_seed(batch_seeds[b]),
                         callback=lambda _: bar.update(1), **options)
        x0 = x0.float()
        if loaded.autoencoder is not None:
            x0 = loaded.autoencoder.decode(x0).float()
        out.append(x0.clamp(-1, 1).cpu())
    bar.close()
    r["control_l"] = control_l.tolist() if uses_control else None
    return torch.cat(out), r


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", disable=not enabled, file=sys.stderr)


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """(N, 3, H, W) in [-1, 1] -> PNG grid (2 px grey padding), written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((images + 1) / 2, nrow=nrow, padding=2, pad_value=0.5)  # (3, H', W')
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condiff sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (step_XXXXXXXX/) or run directory (its latest)")
    src.add_argument("--model", help="zoo name with RANDOM weights, pixel space (smoke tests), e.g. dit-tiny")
    p.add_argument("--conditioning", choices=("class", "text"), default="class", help="zoo models only")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--class-ids", type=int, nargs="+", help="class ids (class-conditional models)")
    what.add_argument("--prompts", nargs="+", help="prompts (text-conditional models)")
    what.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--n-per-cond", type=int, default=1, help="samples per class id / prompt (one grid row each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default per sampler)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 deterministic, 1 DDPM-like)")
    p.add_argument("--guidance", type=guidance_weight_arg, default=4.0, help="lambda of Eq. 2 at the base resolution")
    p.add_argument("--guidance-resolution", type=float, default=None, metavar="PX",
                   help="resolution --guidance is tuned at (default: the model's base resolution)")
    p.add_argument("--control-guidance", type=guidance_weight_arg, default=1.0, help="beta of Eq. 2 (1 = plain CFG)")
    p.add_argument("--no-guidance-law", action="store_true", help="use --guidance as is at every resolution")
    p.add_argument("--rescale-schedule", action="store_true", help="apply Eq. 3 for the sampling resolution")
    p.add_argument("--size-cond", choices=SIZE_MODES, default=None,
                   help="phi_l: train-dist (default if stored), output, or fixed (--orig-size)")
    p.add_argument("--orig-size", type=float, nargs="+", metavar="PX", help="fixed original size H [W] for phi_l")
    p.add_argument("--resolution", type=int, default=None, help="output pixels (default: training resolution)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--raw-weights", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--autoencoder", default=None, metavar="DIR",
                   help="local diffusers AutoencoderKL folder, replacing the checkpoint's (or supplying a missing one)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: n-per-cond, or sqrt)")
    p.add_argument("--out", default="samples.png", help="output PNG (settings go to <out>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _prompts(args) -> list[str] | None:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {path}: no non-empty line")
        return lines
    return args.prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.n_per_cond < 1 or args.steps < 1 or args.batch_size < 1:
            raise ValueError("--n-per-cond, --steps and --batch-size must be >= 1")
        if args.orig_size is not None and len(args.orig_size) not in (1, 2):
            raise ValueError("--orig-size takes H or H W")
        loaded = (load_checkpoint(args.checkpoint, args.device, use_ema=not args.raw_weights) if args.checkpoint
                  else load_zoo(args.model, args.conditioning, args.device, seed=args.seed))
        if args.autoencoder:
            from condiff.data.autoencoder import build_autoencoder

            loaded.autoencoder = build_autoencoder({"kind": "diffusers", "path": args.autoencoder}).to(args.device)
            loaded.meta["autoencoder"] = loaded.autoencoder.config
        cond, null, captions = semantic_conditions(loaded, args.class_ids, _prompts(args), args.n_per_cond)
        orig = (args.orig_size[0], args.orig_size[-1]) if args.orig_size else None
        settings = Settings(seed=args.seed, steps=args.steps, sampler=args.sampler, spacing=args.spacing, eta=args.eta,
                            guidance=args.guidance, control_guidance=args.control_guidance,
                            guidance_law=not args.no_guidance_law, guidance_resolution=args.guidance_resolution,
                            rescale_schedule=args.rescale_schedule,
                            size_cond=args.size_cond, orig_size=orig, resolution=args.resolution,
                            batch_size=args.batch_size, precision=args.precision)
        images, resolved = generate(loaded, cond, null, settings, device=args.device, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"condiff sample: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    nrow = args.nrow or (args.n_per_cond if args.n_per_cond > 1 else math.ceil(math.sqrt(len(images))))
    save_grid(images, out, nrow)
    record = {
        "source": args.checkpoint or f"zoo:{args.model} (random weights)",
        "autoencoder": loaded.meta.get("autoencoder"),
        "settings": vars(settings),
        "captions": captions,
        **{k: v for k, v in resolved.items() if k not in ("schedule", "size_distribution")},
        "schedule": resolved["schedule"].to_dict(),
        "timesteps": spaced_timesteps(settings.steps, resolved["schedule"].num_timesteps, resolved["spacing"]).tolist(),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out} ({len(images)} images, {resolved['resolution']} px, lambda {resolved['guidance_effective']:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
