"""`condiff eval` / `torchrun -m condiff.eval`: generate samples in memory across ranks and feed them
straight to the metrics, then write a manifest (JSON + Markdown table) and an image grid.

    condiff eval --ckpt runs/x --metrics fid,clip,lpips,align --n 50000 --sampler ddim --steps 250 \
        --guidance 1.5 --ref-train 'train-{000000..000999}.tar' --ref-val 'val-{000..049}.tar' \
        --prompts captions.txt --clip /models/clip-vit-large-patch14 --out runs/x/eval
    torchrun --nproc_per_node=8 -m condiff.eval --ckpt ... --num-samples 50000 (same flags; --n is an
        ambiguous prefix for torchrun's own parser, so it is spelled --num-samples there)

Flow: every rank generates its share of the n samples (indices r, r + W, ...; deterministic per global
index: `condiff.eval.generate`); per batch it keeps Inception (or custom) features, CLIP scores and
align flags, never the images (PNG files only with --save-images; the first --grid images are kept
for the grid). Features and per-sample scores are gathered to rank 0, which computes
  fid_train / fid_val   FID against the cached statistics of --ref-train / --ref-val (clean-fid)
  clip                  mean CLIP score, 100 x cosine clipped at 0 (`condiff.eval.clip_score`)
  align/*               shapes alignment accuracies (`condiff.eval.align`; prompts in the shapes grammar)
  lpips_size            LPIPS size-diversity protocol (`condiff.eval.lpips_size`) on --lpips-prompts prompts
and writes --out/manifest.json, report.md, grid.png.

Presets (`--preset`, explicit flags win): the paper's protocols, see PRESETS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from condiff.diffusion.guidance import guidance_weight_arg

METRICS = ("fid", "clip", "lpips", "align")

PRESETS: dict[str, dict] = {
    # Sec. 3 / Tab. 1: 50k samples, 250 DDIM steps, FID against the full training set (FID_train) and
    # the validation set (FID_val); App. B: guidance 1.5 at 256 px and 2.0 at 512 px.
    "fid-256": dict(metrics="fid", n=50_000, sampler="ddim", steps=250, guidance=1.5),
    "fid-512": dict(metrics="fid", n=50_000, sampler="ddim", steps=250, guidance=2.0),
    # Sec. 3, following Esser et al. [14]: COCO val captions (~40k), 25 steps, guidance 5.0.
    "coco": dict(metrics="fid,clip", n=40_000, sampler="ddim", steps=25, guidance=5.0),
    # Sec. 3 / Tab. 2a: ten size conditionings per prompt, averaged over 10k prompts.
    "lpips": dict(metrics="lpips", lpips_prompts=10_000, sampler="ddim", steps=250, guidance=1.5),
    # offline: the shapes dataset's captions, scored by the analytic detector.
    "shapes": dict(metrics="align", n=512, sampler="ddim", steps=50, guidance=3.0, prompts="shapes"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condiff eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (-> latest)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's protocols; explicit flags win")
    p.add_argument("--metrics", default="fid", help=f"comma list of {METRICS}")
    p.add_argument("--out", default=None, help="output directory (default <ckpt>/eval-<time>)")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", "--num-samples", dest="n", type=int, default=50_000,
                   help="number of samples for fid/clip/align (under torchrun write --num-samples: torchrun's own "
                        "parser takes --n for an abbreviation of its options)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default="ddim", help="ddim | dpmpp-2m | heun")
    g.add_argument("--steps", type=int, default=250)
    g.add_argument("--spacing", default=None, help="timestep spacing: trailing | leading | linspace "
                                                  "(default: the sampler's, as condiff sample)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    g.add_argument("--guidance", type=guidance_weight_arg, default=1.5,
                   help="lambda of Eq. 2 (semantic guidance) at the model's base resolution (Eq. 4 elsewhere)")
    g.add_argument("--guidance-resolution", type=float, default=None, metavar="PX",
                   help="resolution --guidance is tuned at (default: the model's base resolution)")
    g.add_argument("--control-guidance", type=guidance_weight_arg, default=1.0, help="beta of Eq. 2 (control guidance)")
    g.add_argument("--size-cond", default="auto",
                   help="auto (train-dist if the checkpoint stores sizes, else output) | train-dist | output | fixed:H[xW]")
    g.add_argument("--resolution", type=int, default=None, help="output pixels (default: training resolution)")
    g.add_argument("--no-guidance-law", action="store_true", help="keep lambda at another resolution (no Eq. 4)")
    g.add_argument("--rescale-schedule", action="store_true", help="Eq. 3 rescaling for the sampling resolution")
    g.add_argument("--precision", default="fp32", help="fp32 | bf16 (autocast of the model forward)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--prompts", default=None,
                   help="text file (one prompt per line), JSONL ('caption' or 'text' field), or shapes[:PRESET] "
                        "(the shapes class captions); for class models: class names used as captions")
    g.add_argument("--raw-weights", action="store_true", help="use the online weights instead of the EMA")
    g.add_argument("--autoencoder", default=None, metavar="DIR",
                   help="local diffusers AutoencoderKL folder, replacing the checkpoint's (or supplying a missing one)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    f = p.add_argument_group("fid")
    f.add_argument("--ref-train", default=None, help="training shard set (brace/glob): FID_train")
    f.add_argument("--ref-val", default=None, help="validation shard set: FID_val")
    f.add_argument("--ref-max", type=int, default=None, help="use at most this many reference images")
    f.add_argument("--features", default="inception",
                   help="inception | inception:PATH | random[:DIM[:SIZE[:SEED]]] (offline tests)")
    f.add_argument("--inception", default=None, help="path of clean-fid's inception-2015-12-05.pt (or its directory)")
    f.add_argument("--cache-dir", default=None, help="reference statistics cache (default $CONDIFF_CACHE or ~/.cache/condiff)")
    c = p.add_argument_group("clip")
    c.add_argument("--clip", default=None, help="local Hugging Face CLIP directory (or $CONDIFF_CLIP)")
    lp = p.add_argument_group("lpips size-diversity")
    lp.add_argument("--lpips-prompts", type=int, default=100, help="number of prompts (paper: 10k)")
    lp.add_argument("--lpips-sizes", default=None, help="comma list of sizes (default: 10 in [res, 4 res])")
    lp.add_argument("--lpips-include-low", action="store_true", help="keep sizes below the resolution")
    lp.add_argument("--lpips-net", default="alex", help="alex | vgg")
    lp.add_argument("--lpips-backbone", default=None, help="torchvision weights file of the backbone")
    lp.add_argument("--lpips-random", action="store_true", help="random backbone (offline smoke tests)")
    o = p.add_argument_group("outputs")
    o.add_argument("--grid", type=int, default=64, help="samples in grid.png (0: none)")
    o.add_argument("--save-images", default=None, help="also write every sample as DIR/<index>.png")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)  # --ckpt is required: parse_known_args still errors if absent
    if pre.preset:
        parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        parser.error(f"--metrics: unknown {bad}; expected a comma list of {list(METRICS)}")
    args.metrics = metrics
    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        parser.error("--n, --batch-size and --steps must be >= 1")
    if "fid" in metrics and not (args.ref_train or args.ref_val):
        parser.error("--metrics fid needs --ref-train and/or --ref-val (reference shard sets)")
    if "fid" in metrics and args.n < 2:
        parser.error("--metrics fid needs --n >= 2")
    return args


def load_prompts(spec: str | None) -> list[str] | None:
    """Prompts from a text file, a JSONL file, or `shapes[:PRESET]` (the class captions of a shapes config)."""
    if spec is None:
        return None
    if spec == "shapes" or spec.startswith("shapes:"):
        from condiff.data import shapes

        return shapes.class_names(shapes.get_config(spec.partition(":")[2] or "default"))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {spec}: no such file (expected a text/JSONL file or shapes[:PRESET])")
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
                prompts.append(str(rec.get("caption", rec.get("text"))))
            except (json.JSONDecodeError, AttributeError) as exn:
                raise ValueError(f"--prompts {spec}:{lineno}: expected a JSON object with 'caption' or 'text'") from exn
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts {spec}: no prompt found")
    return prompts


class Dist:
    """Rank / world size and the gathers the evaluation needs (no-ops in a single process)."""

    def __init__(self, device: str):
        from condiff.train import distributed

        self.info = distributed.init(device)
        self.rank, self.world, self.device = self.info.rank, self.info.world_size, self.info.device

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Objects of every rank on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def shutdown(self):
        from condiff.train import distributed

        distributed.shutdown()


def _log(dist: Dist, msg: str) -> None:
    if dist.rank == 0:
        print(f"[condiff eval] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from condiff.eval import align, fid, manifest
    from condiff.eval.generate import Generator, SamplingSpec
    from condiff.train.checkpoint import load_for_inference, resolve_checkpoint

    dist = Dist(args.device)
    t_start = time.time()
    try:
        ckpt = resolve_checkpoint(args.ckpt)
        inf = load_for_inference(ckpt, device=dist.device, use_ema=not args.raw_weights)
        if args.autoencoder:  # as `condiff sample --autoencoder` (converted checkpoints store no VAE)
            from condiff.data.autoencoder import build_autoencoder

            inf.autoencoder = build_autoencoder({"kind": "diffusers", "path": args.autoencoder}).to(dist.device)
            inf.meta["autoencoder"] = inf.autoencoder.config
        spec = SamplingSpec(n=args.n, seed=args.seed, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                            eta=args.eta, guidance=args.guidance, control_guidance=args.control_guidance,
                            size_cond=args.size_cond, resolution=args.resolution, guidance_law=not args.no_guidance_law,
                            guidance_resolution=args.guidance_resolution,
                            rescale_schedule=args.rescale_schedule, precision=args.precision,
                            batch_size=args.batch_size)
        prompts = load_prompts(args.prompts)
        gen = Generator(inf, spec, prompts, device=dist.device)
        out_dir = Path(args.out or ckpt / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
        _log(dist, f"{ckpt} | {gen.conditioning}-conditioned at {gen.resolution} px | world {dist.world} | "
                   f"metrics {args.metrics}")

        extractor = refs = clip_scorer = None
        if "fid" in args.metrics:
            feat_spec = f"inception:{args.inception}" if args.features == "inception" and args.inception else args.features
            extractor = fid.build_extractor(feat_spec, device=dist.device, batch_size=args.batch_size)
            refs = {}
            for split, shards in (("train", args.ref_train), ("val", args.ref_val)):
                if shards:
                    refs[split] = fid.reference_stats(shards, extractor, gen.resolution, cache_dir=args.cache_dir,
                                                      max_images=args.ref_max, rank=dist.rank,
                                                      world_size=dist.world, gather=dist.all_gather,
                                                      log=lambda m: _log(dist, m))
        if "clip" in args.metrics:
            from condiff.eval.clip_score import ClipScorer

            if gen.conditioning != "text" and prompts is None:
                raise ValueError("--metrics clip on a class model needs class names as --prompts")
            clip_scorer = ClipScorer(args.clip, device=dist.device, batch_size=args.batch_size)
        if "align" in args.metrics:
            if prompts is None:
                raise ValueError("--metrics align needs shapes captions: --prompts shapes[:PRESET] (or a file of them)")
            from condiff.data.shapes import parse_caption

            for prompt in prompts:  # fail before sampling, naming the first caption outside the grammar
                parse_caption(prompt)

        # ---- generation + per-batch metric inputs (this rank's share) ----
        feats, clip_scores, align_flags, grid = [], [], [], []
        save_dir = Path(args.save_images) if args.save_images else None
        needs_samples = any(m in args.metrics for m in ("fid", "clip", "align"))
        n_batches = gen.num_batches(dist.rank, dist.world) if needs_samples else 0
        t_gen = time.time()
        for b, (idx, images) in enumerate(gen.batches(dist.rank, dist.world) if needs_samples else []):
            captions = [gen.caption(i) for i in idx]
            if extractor is not None:
                feats.append((idx, extractor.features(images)))
            if clip_scorer is not None:
                clip_scores += list(zip(idx, clip_scorer(images, captions).tolist()))
            if "align" in args.metrics:
                align_flags += list(zip(idx, align.score_samples(images, captions)))
            grid += [(i, img) for i, img in zip(idx, images.cpu()) if i < args.grid]
            if save_dir is not None:
                _save_pngs(save_dir, idx, images)
            if dist.rank == 0 and (b + 1) % max(1, n_batches // 10) == 0:
                rate = (b + 1) * args.batch_size * dist.world / (time.time() - t_gen)
                _log(dist, f"batch {b + 1}/{n_batches} ({rate:.2f} img/s over all ranks)")

        metrics: dict[str, float] = {}
        if extractor is not None:
            parts = dist.gather(feats)
            if dist.rank == 0:
                pairs = sorted((i, row) for part in parts for idx, f in part for i, row in zip(idx, f))
                gen_stats = fid.FidStats.from_features(np.stack([row for _, row in pairs]))
                for split, ref in refs.items():
                    metrics[f"fid_{split}"] = fid.frechet_distance(gen_stats, ref)
        if clip_scorer is not None:
            parts = dist.gather(clip_scores)
            if dist.rank == 0:
                metrics["clip"] = float(np.mean([s for part in parts for _, s in part]))
        if "align" in args.metrics:
            parts = dist.gather(align_flags)
            if dist.rank == 0:
                flags = [f for _, f in sorted((p for part in parts for p in part), key=lambda p: p[0])]
                metrics.update({f"align/{k}": v for k, v in align.aggregate(flags).items()})
        lpips_settings, nrow = {}, None
        if "lpips" in args.metrics:
            lpips_value, lpips_settings, sweeps = _lpips(args, gen, dist)
            if dist.rank == 0:
                metrics["lpips_size"] = lpips_value
            if not grid:  # an LPIPS-only run shows its first size sweeps: one row per prompt, one column per size
                grid, nrow = sweeps, len(lpips_settings["lpips_sizes"])
        grid_parts = dist.gather(grid)

        if dist.rank == 0:
            settings = {k: v for k, v in spec.to_dict().items()
                        if k not in ("sampler", "steps", "guidance", "control_guidance", "size_cond", "n", "seed")}
            settings.update(metrics=args.metrics, guidance_effective=gen.guidance, spacing=gen.spacing,
                            guidance_resolution=gen.resolved["guidance_resolution"],
                            train_resolution=gen.train_resolution,
                            weights=inf.meta.get("weights"),
                            prompts=args.prompts, n_prompts=len(prompts) if prompts else None,
                            autoencoder=inf.meta.get("autoencoder"),
                            features=extractor.name if extractor else None, clip=args.clip if clip_scorer else None,
                            ref_shards={k: v for k, v in (("train", args.ref_train), ("val", args.ref_val)) if v},
                            ref_n={k: r.n for k, r in (refs or {}).items()}, wall_s=round(time.time() - t_start, 2),
                            **lpips_settings)
            m = manifest.Manifest(
                checkpoint=str(ckpt), checkpoint_hash=manifest.checkpoint_hash(ckpt), sampler=spec.sampler,
                steps=spec.steps, guidance=spec.guidance, control_guidance=spec.control_guidance,
                size_cond=gen.size_mode if gen.size_mode != "fixed" else spec.size_cond,
                n=spec.n if needs_samples else 0, seed=spec.seed,
                resolution=gen.resolution, metrics=metrics, reference={k: r.key for k, r in (refs or {}).items()},
                settings=settings, world_size=dist.world, command=" ".join(["condiff eval", *argv]))
            manifest.save(m, out_dir)
            shown = sorted((p for part in grid_parts for p in part), key=lambda p: p[0])
            if shown:
                manifest.save_grid(torch.stack([img for _, img in shown]), out_dir / "grid.png", nrow=nrow)
            _log(dist, "results: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            _log(dist, f"wrote {out_dir / 'manifest.json'}, report.md{', grid.png' if shown else ''}")
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming what is wrong, exit status 2
        print(f"condiff eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


def _save_pngs(save_dir: Path, idx: list[int], images: torch.Tensor) -> None:
    from PIL import Image

    from condiff.eval.fid import to_uint8

    save_dir.mkdir(parents=True, exist_ok=True)
    for i, u8 in zip(idx, to_uint8(images)):
        Image.fromarray(u8).save(save_dir / f"{i:06d}.png")


def _lpips(args, gen, dist: Dist) -> tuple[float | None, dict, list]:
    """LPIPS size-diversity over args.lpips_prompts prompts, split across ranks (prompt i on rank i % W).
    Returns (mean on rank 0 else None, settings, [(order key, image)] of the first 4 prompts' size sweeps)."""
    from condiff.eval import lpips_size
    from condiff.eval.generate import rank_indices

    if not gen.has_control:
        raise ValueError("--metrics lpips measures size conditioning, but this model has no control conditioning")
    sizes = ([int(s) for s in args.lpips_sizes.split(",")] if args.lpips_sizes
             else lpips_size.default_sizes(gen.resolution))
    sizes = lpips_size.protocol_sizes(sizes, gen.resolution, args.lpips_include_low)
    net = lpips_size.lpips_model(args.lpips_net, args.lpips_backbone, args.lpips_random, device=dist.device)
    mine = rank_indices(args.lpips_prompts, dist.rank, dist.world)

    sweeps = []

    def sample_fn(noise, indices, size_t):  # "prompts" are global prompt indices: cond by index, sizes per row
        images = gen.sample(noise, gen.cond(indices, size_t), indices[0])
        k = len(sizes)
        sweeps.extend(((i, r % k), img.cpu()) for r, (i, img) in enumerate(zip(indices, images)) if i < 4)
        return images

    _, per = lpips_size.size_diversity(sample_fn, mine, lambda p: gen.noise(mine[p]), sizes, net,
                                       prompts_per_batch=max(1, args.batch_size // len(sizes)))
    scores = list(zip(mine, per))
    parts = dist.gather(scores)
    settings = {"lpips_sizes": sizes, "lpips_prompts": args.lpips_prompts, "lpips_net": args.lpips_net,
                "lpips_backbone": "random" if args.lpips_random else str(args.lpips_backbone or "default")}
    if dist.rank != 0:
        return None, settings, sweeps
    return float(np.mean([s for part in parts for _, s in part])), settings, sweeps


if __name__ == "__main__":
    raise SystemExit(main())
