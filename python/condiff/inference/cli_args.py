"""The sampling flags shared by `condiff sample` and `condiff eval` (one vocabulary, one set of defaults:
`SamplingSpec`'s), and the spec they build."""

from __future__ import annotations

import argparse

from condiff.diffusion.guidance import guidance_weight_arg
from condiff.diffusion.sampling import SAMPLERS, SPACINGS
from condiff.inference.spec import PRECISIONS, SIZE_COND_SYNTAX, SamplingSpec

GUIDANCE_HELP = ("lambda of Eq. 2 (semantic guidance; 1 = none), given at the model's BASE resolution (the schedule's "
                 "Eq. 3 base, else its positional-grid anchor, else its training resolution; --guidance-resolution "
                 "overrides); at another output resolution Eq. 4 gives the lambda actually used, "
                 "1 + s (lambda - 1) with s = output / base (H x W outputs: sqrt(H W) / base, the pixel-count "
                 "scale), which every record writes. Default %(default)s")


def add_source_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Positional RUN (checkpoint or run directory) or --checkpoint; --raw-weights."""
    p.add_argument("run", nargs="?", default=None, metavar="RUN",
                   help="checkpoint directory (step_XXXXXXXX/) or run directory (its latest checkpoint)")
    p.add_argument("--checkpoint", default=None, help="same as RUN")
    p.add_argument("--ckpt", dest="checkpoint", help=argparse.SUPPRESS)  # old spelling (condiff eval)
    p.add_argument("--raw-weights", action="store_true", help="use the online (raw) weights instead of the EMA weights")
    p.add_argument("--autoencoder", default=None, metavar="DIR",
                   help="local diffusers AutoencoderKL folder, replacing the checkpoint's (or supplying a missing one)")


def source_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    if args.run and args.checkpoint and args.run != args.checkpoint:
        parser.error(f"give the checkpoint once: RUN {args.run!r} and --checkpoint {args.checkpoint!r} differ")
    return args.run or args.checkpoint


def add_sampling_args(p: argparse.ArgumentParser, steps: int = SamplingSpec.steps,
                      batch_size: int = SamplingSpec.batch_size) -> argparse._ArgumentGroup:
    """Add the "sampling" group (defaults: SamplingSpec's, steps / batch size per command); returns it."""
    d = SamplingSpec()
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default=d.sampler)
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default: the sampler's)")
    g.add_argument("--eta", type=float, default=d.eta, help="DDIM noise (0 deterministic, 1 DDPM-like)")
    g.add_argument("--guidance", type=guidance_weight_arg, default=d.guidance, help=GUIDANCE_HELP)
    g.add_argument("--guidance-resolution", type=float, default=None, metavar="PX",
                   help="the resolution --guidance is given at (default: the model's base resolution)")
    g.add_argument("--no-guidance-law", action="store_true", help="use --guidance as is at every resolution (no Eq. 4)")
    g.add_argument("--control-guidance", type=guidance_weight_arg, default=d.control_guidance, help="beta of Eq. 2 (1 = plain CFG)")
    g.add_argument("--size-cond", default=d.size_cond,
                   help=f"size conditioning phi_l (Table 2b): {SIZE_COND_SYNTAX}; auto = train-dist when the "
                        "checkpoint stores training sizes, else output")
    g.add_argument("--flip", type=int, choices=(0, 1), default=d.flip,
                   help="flip field of the control condition phi_h (Table 2c): 1 asks a flip-conditioned model for "
                        "the mirrored image (default 0)")
    g.add_argument("--orig-size", type=float, nargs="+", default=None, help=argparse.SUPPRESS)  # = fixed:HxW
    g.add_argument("--resolution", type=int, default=None, help="output pixels (default: the training resolution)")
    g.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="output height and width in pixels, any aspect (each a multiple of the autoencoder factor x "
                        "the patch); the aspect and size conditions follow it; instead of --resolution")
    g.add_argument("--rescale-schedule", action="store_true", help="apply Eq. 3 for the sampling resolution")
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="autocast of the model forward")
    return g


def spec_of(args: argparse.Namespace) -> SamplingSpec:
    size_cond = args.size_cond
    if args.orig_size:
        if len(args.orig_size) not in (1, 2):
            raise ValueError("--orig-size takes H or H W (prefer --size-cond fixed:HxW)")
        size_cond = f"fixed:{args.orig_size[0]:g}x{args.orig_size[-1]:g}"
    return SamplingSpec(seed=args.seed, sampler=args.sampler, steps=args.steps, spacing=args.spacing, eta=args.eta,
                        guidance=args.guidance, guidance_resolution=args.guidance_resolution,
                        guidance_law=not args.no_guidance_law, control_guidance=args.control_guidance,
                        size_cond=size_cond, flip=args.flip, resolution=args.resolution,
                        size=tuple(args.size) if args.size else None, aspects=getattr(args, "aspects", None),
                        rescale_schedule=args.rescale_schedule,
                        batch_size=args.batch_size, precision=args.precision)
