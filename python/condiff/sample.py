"""`condiff sample`: a PNG grid from a trained checkpoint, or from a zoo model with random weights (smoke tests).

    condiff sample runs/imagenet256 --class-ids 207 360 387 --n-per-cond 4 --guidance 1.5
    condiff sample runs/cc12m --prompts "a corgi on a beach" --resolution 512 --size-cond uniform:512-1024
    condiff sample --model dit-tiny --class-ids 1 2 3            # random weights, pixel space, 32 px
    condiff sample runs/shapes --prompts "a red circle" --size 32 64   # 2:1 (H 32, W 64): aspect 2 conditioned

What it does (every choice is written next to the PNG in `<out>.json`, the lambda actually used included):
  1. model: `Pipeline.from_checkpoint(RUN)` (EMA weights unless --raw-weights; the checkpoint's schedule,
     text encoder and autoencoder), or `Pipeline.from_zoo(name)` with random weights in pixel space.
  2. conditions: each class id / prompt repeated --n-per-cond times (one grid row each); the null semantic
     condition of guidance is the null class or the encoding of "" (condiff.conditioning.cond).
  3. sampling: `condiff.inference` (the same path as `condiff eval` and training previews): size
     conditioning (--size-cond, Table 2b), guidance Eq. 2 with lambda = --guidance at the model's base
     resolution (Eq. 4 at other output resolutions; s = sqrt(H W) / base for an --size H W output) and
     beta = --control-guidance, the sampler over --steps. --size H W samples any aspect (default: the
     trained size); phi_h's aspect_ratio is W / H and phi_l follows --size-cond for that shape.
  4. record: `<out>.json` holds the spec, the resolved settings (size [H, W], aspect W / H, the lambda
     used, the size bucket drawn from), and each sample's control_h / control_l.
Determinism: sample i's noise and size draw come from a generator seeded with (--seed, i), so the same
seed and settings give the same PNG whatever --batch-size (bit-exact on the same machine and device).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from condiff.inference.cli_args import add_sampling_args, add_source_args, source_of, spec_of


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condiff sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--model", help="zoo name with RANDOM weights, pixel space (smoke tests), e.g. dit-tiny")
    p.add_argument("--conditioning", choices=("class", "text"), default="class", help="zoo models only")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--class-ids", type=int, nargs="+", help="class ids (class-conditional models)")
    what.add_argument("--prompts", nargs="+", help="prompts (text-conditional models)")
    what.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--n-per-cond", type=int, default=1, help="samples per class id / prompt (one grid row each)")
    add_sampling_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nrow", type=int, default=None,
                   help="images per grid row (default: n-per-cond, one captioned row per condition; with "
                        "--raw-grid: n-per-cond, or sqrt)")
    p.add_argument("--cell", type=int, default=96,
                   help="smaller samples are nearest-upscaled by an integer factor to at least this many px (default 96)")
    p.add_argument("--raw-grid", action="store_true",
                   help="the samples' own pixels: no upscaling, no captions (the layout `condiff eval` uses)")
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
    from condiff.inference.captions import outside_note
    from condiff.inference.generate import Generator
    from condiff.inference.grid import save_grid
    from condiff.inference.pipeline import Pipeline

    parser = build_parser()
    args = parser.parse_args(argv)
    source = source_of(args, parser)
    if bool(source) == bool(args.model):
        parser.error("give a checkpoint / run directory (RUN or --checkpoint) or --model, exactly one")
    try:
        if args.n_per_cond < 1:
            raise ValueError("--n-per-cond must be >= 1")
        spec = spec_of(args)
        pipe = (Pipeline.from_checkpoint(source, args.device, "model" if args.raw_weights else "ema", args.autoencoder)
                if source else Pipeline.from_zoo(args.model, args.conditioning, args.device, seed=args.seed))
        if args.autoencoder and not source:
            pipe = pipe.with_autoencoder(args.autoencoder, args.device)
        items = pipe.check_items(args.class_ids, _prompts(args))
        note = outside_note(items, pipe.meta) if pipe.conditioning == "text" else None
        if note:
            print(f"condiff sample: {note}", file=sys.stderr)
        rows = [x for x in items for _ in range(args.n_per_cond)]
        gen = Generator(pipe, spec, rows, device=args.device)
        images = gen.generate(progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"condiff sample: error: {e}", file=sys.stderr)
        return 2
    captions = [str(r) if pipe.conditioning == "text" else f"class {r}" for r in rows]
    if args.raw_grid:
        nrow = args.nrow or (args.n_per_cond if args.n_per_cond > 1 else math.ceil(math.sqrt(len(images))))
        layout = {"nrow": nrow}
    else:  # one row per condition, captioned, small samples upscaled (the demo's presentation)
        nrow = args.nrow or args.n_per_cond
        row_captions = captions[::nrow] if nrow == args.n_per_cond else None
        layout = {"nrow": nrow, "min_cell": args.cell, "row_captions": row_captions}
    cond = gen.cond(list(range(len(rows)))) if pipe.has_control else None
    control = {f: None if cond is None else getattr(cond, f).tolist() for f in ("control_h", "control_l")}
    out = save_grid(images, Path(args.out), **layout, record={**gen.record(), "captions": captions, **control})
    (h, w) = gen.size
    print(f"wrote {out} ({len(images)} images, {h}x{w} px, lambda {gen.guidance:g} used)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
