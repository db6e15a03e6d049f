"""`condiff eval` / `torchrun -m condiff.eval`: generate samples in memory across ranks and feed them
straight to the metrics, then write a manifest (JSON + Markdown table) and an image grid.

    condiff eval runs/x --metrics fid,clip,lpips,align --n 50000 --sampler ddim --steps 250 \
        --guidance 1.5 --ref-train 'train-{000000..000999}.tar' --ref-val 'val-{000..049}.tar' \
        --prompts captions.txt --clip /models/clip-vit-large-patch14 --out runs/x/eval
    torchrun --nproc_per_node=8 -m condiff.eval runs/x ... --num-samples 50000 (same flags; --n is an
        ambiguous prefix for torchrun's own parser, so it is spelled --num-samples there)

Flow: set-up (load the checkpoint into a `Generator`, build the metrics of `--metrics`, which check
their inputs and compute or load FID reference statistics before anything is sampled), then one
generation loop: every rank generates its share of each stream of samples the metrics need (indices
r, r + W, ...; deterministic per global index: `condiff.inference.generate`) and feeds every batch to every
metric of that stream (`condiff.eval.metrics`: each keeps per-index features or scores, never the
images; PNG files only with --save-images; the first --grid images are kept for the grid). Then one
gather of every metric's state to rank 0, which merges them and computes
  fid_train / fid_val   FID against the cached statistics of --ref-train / --ref-val (clean-fid)
  clip                  mean CLIP score, 100 x cosine clipped at 0 (`condiff.eval.clip_score`)
  align/*               shapes alignment accuracies (`condiff.eval.align`; prompts in the shapes grammar)
  lpips_size            LPIPS size-diversity protocol (`condiff.eval.lpips_size`) on --lpips-prompts
                        prompts, fed size sweeps (one per prompt) instead of single samples
  shapes_fd             Frechet distance on the features of a small CNN trained on the shapes data, against
                        rendered shapes images (`condiff.eval.metrics.shapes_fd`; no weights to fetch)
  content_change        content change of the same size sweeps as lpips_size, each image against the first
                        size (`condiff.eval.content_change`: detected objects + low-pass pixels; shapes data)
and writes --out/manifest.json, report.md, grid.png.

Presets (`--preset`, explicit flags win): the paper's protocols, see PRESETS. `--guidance` means what it
means for `condiff sample` (lambda at the model's base resolution, Eq. 4 elsewhere); the manifest's
`guidance` is the lambda actually used, `settings.guidance_given` / `guidance_resolution` what was given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from condiff.inference.cli_args import add_sampling_args, add_source_args, source_of, spec_of

METRICS = ("fid", "clip", "lpips", "align", "shapes-fd", "content-change")

PRESETS: dict[str, dict] = {
    # Each preset fixes the lambda ACTUALLY USED (the manifest's `guidance`), whatever the model's base resolution.
    # Sec. 3 / Tab. 1: 50k samples, 250 DDIM steps, FID against the training set (FID_train) and the validation
    # set (FID_val); App. B: lambda 1.5 at 256 px and 2.0 at 512 px (Eq. 4 with s = 2 maps one to the other).
    "fid-256": dict(metrics="fid", n=50_000, sampler="ddim", steps=250, resolution=256, guidance=1.5,
                    guidance_resolution=256),
    "fid-512": dict(metrics="fid", n=50_000, sampler="ddim", steps=250, resolution=512, guidance=2.0,
                    guidance_resolution=512),
    # Sec. 3, following Esser et al. [14]: COCO val captions (~40k), 25 steps, lambda 5.0 as used (no Eq. 4).
    "coco": dict(metrics="fid,clip", n=40_000, sampler="ddim", steps=25, guidance=5.0, no_guidance_law=True),
    # Sec. 3 / Tab. 2a: ten size conditionings per prompt, averaged over 10k prompts; lambda 1.5 at the base.
    "lpips": dict(metrics="lpips", lpips_prompts=10_000, sampler="ddim", steps=250, guidance=1.5),
    # offline: the shapes dataset's captions, scored by the analytic detector; lambda 3.0 at the base.
    "shapes": dict(metrics="align", n=512, sampler="ddim", steps=50, guidance=3.0, prompts="shapes"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condiff eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's protocols; explicit flags win")
    p.add_argument("--metrics", default="fid", help=f"comma list of {METRICS}")
    p.add_argument("--out", default=None, help="output directory (default <run dir>/eval/<step dir>-<time>)")
    g = add_sampling_args(p, steps=250, batch_size=32)
    g.add_argument("--n", "--num-samples", dest="n", type=int, default=50_000,
                   help="number of samples for fid/clip/align (under torchrun write --num-samples: torchrun's own "
                        "parser takes --n for an abbreviation of its options)")
    g.add_argument("--prompts", default=None,
                   help="text file (one prompt per line), JSONL ('caption' or 'text' field), or shapes[:PRESET] "
                        "(the shapes class captions); for class models: class names used as captions")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    f = p.add_argument_group("fid")
    f.add_argument("--ref-train", default=None, help="training shard set (brace/glob): FID_train")
    f.add_argument("--ref-val", default=None, help="validation shard set: FID_val")
    f.add_argument("--ref-max", type=int, default=None, help="use at most this many reference images")
    f.add_argument("--features", default="inception",
                   help="inception | inception:PATH | shapes (CNN trained on the shapes data) | random[:DIM[:SIZE[:SEED]]]")
    f.add_argument("--inception", default=None, help="path of clean-fid's inception-2015-12-05.pt (or its directory)")
    f.add_argument("--cache-dir", default=None, help="reference statistics cache (default $CONDIFF_CACHE or ~/.cache/condiff)")
    sf = p.add_argument_group("shapes-fd")
    sf.add_argument("--shapes-preset", default=None,
                    help="shapes preset of the reference images (default: PRESET of --prompts shapes:PRESET, else default)")
    sf.add_argument("--shapes-ref-n", type=int, default=2000, help="rendered reference images")
    c = p.add_argument_group("clip")
    c.add_argument("--clip", default=None, help="local Hugging Face CLIP directory (or $CONDIFF_CLIP)")
    lp = p.add_argument_group("lpips size-diversity (and content-change: the same size sweeps)")
    lp.add_argument("--lpips-prompts", type=int, default=100, help="number of prompts (paper: 10k)")
    lp.add_argument("--lpips-sizes", default=None, help="comma list of sizes (default: 10 in [res, 4 res])")
    lp.add_argument("--lpips-include-low", action="store_true", help="keep sizes below the resolution")
    lp.add_argument("--lpips-net", default="alex", help="alex | vgg")
    lp.add_argument("--lpips-backbone", default=None, help="torchvision weights file of the backbone")
    lp.add_argument("--lpips-random", action="store_true", help="random backbone (offline smoke tests)")
    o = p.add_argument_group("outputs")
    o.add_argument("--grid", type=int, default=64, help="samples in grid.png (0: none)")
    o.add_argument("--save-images", default=None, help="also write every sample as DIR/<index>.png")
    e = p.add_argument_group("post-hoc EMA sweep (condiff.eval.ema_sweep)")
    e.add_argument("--ema-sweep", default=None, metavar="LO:HI:N",
                   help="evaluate --ckpt (a run with phema/ snapshots) at N reconstructed EMA lengths sigma_rel")
    e.add_argument("--sweep-metric", default=None, help="metric that picks the best length (default: "
                                                         "align/overall, fid_val, fid_train, clip, lpips_size)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.preset:
        parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    args.checkpoint = source_of(args, parser)
    if not args.checkpoint:
        parser.error("give the checkpoint or run directory to evaluate (RUN or --checkpoint)")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        parser.error(f"--metrics: unknown {bad}; expected a comma list of {list(METRICS)}")
    args.metrics = metrics
    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        parser.error("--n, --batch-size and --steps must be >= 1")
    if "fid" in metrics and not (args.ref_train or args.ref_val):
        parser.error("--metrics fid needs --ref-train and/or --ref-val (reference shard sets)")
    if ("fid" in metrics or "shapes-fd" in metrics) and args.n < 2:
        parser.error("--metrics fid / shapes-fd need --n >= 2")
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
        from condiff import distributed

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
        from condiff import distributed

        distributed.shutdown()


def _log(dist: Dist, msg: str) -> None:
    if dist.rank == 0:
        print(f"[condiff eval] {msg}", flush=True)


def load_generator(args: argparse.Namespace, device) -> tuple:
    """Set-up of the sampler: (checkpoint directory, loaded `Pipeline`, `Generator`, prompts or None)."""
    from condiff.inference.generate import Generator
    from condiff.inference.pipeline import Pipeline

    inf = Pipeline.from_checkpoint(args.checkpoint, device, "model" if args.raw_weights else "ema", args.autoencoder)
    prompts = load_prompts(args.prompts)
    text = inf.conditioning == "text"
    gen = Generator(inf, spec_of(args), prompts if text else None, None if text else prompts, device=device)
    return Path(inf.source), inf, gen, prompts


def batch_samples(batch_size: int, stream) -> int:
    """Samples per generated batch: `batch_size` images, or as many size sweeps as fit in it (at least one)."""
    return batch_size if stream.sizes is None else max(1, batch_size // len(stream.sizes))


def generate(gen, stream, rank: int, world: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """This rank's share of `stream` (`condiff.eval.metrics.Stream`): (global indices, images) batches,
    images (B, 3, H, W) in [-1, 1], or (B, K, 3, H, W) size sweeps (B prompts, K sizes per batch)."""
    from condiff.inference.generate import rank_indices
    from condiff.eval.lpips_size import size_sweep

    if stream.sizes is None:
        yield from gen.batches(rank, world, stream.n)
        return
    mine, k = rank_indices(stream.n, rank, world), len(stream.sizes)
    per_batch = batch_samples(gen.spec.batch_size, stream)
    for start in range(0, len(mine), per_batch):
        idx = mine[start:start + per_batch]
        noise, sizes = size_sweep(torch.stack([gen.noise(i) for i in idx]), list(stream.sizes))  # (B K, C, h, w)
        images = gen.sample(noise, gen.cond([i for i in idx for _ in range(k)], sizes), idx[0])  # (B K, 3, H, W)
        yield idx, images.reshape(len(idx), k, *images.shape[1:])


def build_metrics(args: argparse.Namespace, gen, prompts: list[str] | None, dist: Dist) -> dict:
    """{name: `Metric`} for `args.metrics`, checked and set up before any sampling (reference statistics
    are computed here, split across ranks)."""
    from condiff.eval.metrics import Stream

    samples = Stream(args.n)
    metrics = {}
    if "fid" in args.metrics:
        from condiff.eval.features import build_extractor
        from condiff.eval.metrics.fid import Fid
        from condiff.eval.reference import reference_stats

        feat_spec = f"inception:{args.inception}" if args.features == "inception" and args.inception else args.features
        extractor = build_extractor(feat_spec, device=dist.device, batch_size=args.batch_size)
        shards = {k: v for k, v in (("train", args.ref_train), ("val", args.ref_val)) if v}
        refs = {split: reference_stats(spec, extractor, gen.resolution, cache_dir=args.cache_dir,
                                       max_images=args.ref_max, rank=dist.rank, world_size=dist.world,
                                       gather=dist.all_gather, log=lambda m: _log(dist, m))
                for split, spec in shards.items()}
        metrics["fid"] = Fid(samples, extractor, refs, shards)
    if "clip" in args.metrics:
        from condiff.eval.clip_score import ClipScorer
        from condiff.eval.metrics.clip import ClipScore

        if gen.conditioning != "text" and prompts is None:
            raise ValueError("--metrics clip on a class model needs class names as --prompts")
        scorer = ClipScorer(args.clip, device=dist.device, batch_size=args.batch_size)
        metrics["clip"] = ClipScore(samples, scorer, gen.caption, source=args.clip)
    if "align" in args.metrics:
        from condiff.data.shapes import parse_caption
        from condiff.eval.metrics.align import Align

        if prompts is None:
            raise ValueError("--metrics align needs shapes captions: --prompts shapes[:PRESET] (or a file of them)")
        for prompt in prompts:  # fail before sampling, naming the first caption outside the grammar
            parse_caption(prompt)
        metrics["align"] = Align(samples, gen.caption)
    if "shapes-fd" in args.metrics:
        from condiff.eval.metrics.shapes_fd import ShapesFd

        preset = args.shapes_preset or (args.prompts.partition(":")[2] or "default"
                                        if args.prompts and args.prompts.split(":")[0] == "shapes" else "default")
        metrics["shapes-fd"] = ShapesFd(samples, gen.resolution, preset, args.shapes_ref_n, cache_dir=args.cache_dir,
                                        device=dist.device, log=lambda m: _log(dist, m))
    sweeps = [m for m in ("lpips", "content-change") if m in args.metrics]
    if sweeps:
        from condiff.eval import lpips_size

        if not gen.has_control:
            raise ValueError(f"--metrics {','.join(sweeps)} measures size conditioning, but this model has no "
                             "control conditioning")
        sizes = ([int(s) for s in args.lpips_sizes.split(",")] if args.lpips_sizes
                 else lpips_size.default_sizes(gen.resolution))
        sweep = Stream(args.lpips_prompts, tuple(lpips_size.protocol_sizes(sizes, gen.resolution, args.lpips_include_low)))
    if "lpips" in args.metrics:
        from condiff.eval.metrics.lpips import LpipsSize

        net = lpips_size.lpips_model(args.lpips_net, args.lpips_backbone, args.lpips_random, device=dist.device)
        record = {"lpips_net": args.lpips_net,
                  "lpips_backbone": "random" if args.lpips_random else str(args.lpips_backbone or "default")}
        metrics["lpips"] = LpipsSize(sweep, net, record)
    if "content-change" in args.metrics:
        from condiff.eval.metrics.content_change import ContentChange

        metrics["content-change"] = ContentChange(sweep)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.ema_sweep:
        from condiff.eval.ema_sweep import strip_flags, sweep

        try:
            rest = [a for a in argv if a != args.run] if args.run else argv  # the positional RUN is set per length
            sweep(main, strip_flags(rest), args.checkpoint, args.ema_sweep, args.out, args.sweep_metric)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"condiff eval: error: {e}", file=sys.stderr)
            return 2
        return 0
    from condiff.eval.metrics.grid import Grid

    dist = Dist(args.device)
    t_start = time.time()
    try:
        # ---- set-up: sampler, metrics, grid ----
        ckpt, inf, gen, prompts = load_generator(args, dist.device)
        out_dir = Path(args.out) if args.out else default_out_dir(ckpt)
        _log(dist, f"{ckpt} | {gen.conditioning}-conditioned at {gen.resolution} px | world {dist.world} | "
                   f"metrics {args.metrics}")
        metrics = build_metrics(args, gen, prompts, dist)
        streams = list(dict.fromkeys(m.stream for m in metrics.values()))  # distinct, in metric order
        consumers = list(metrics.values())
        if args.grid > 0:  # the first samples, or (LPIPS-only run) the first 4 prompts' size sweeps
            plain = [s for s in streams if s.sizes is None]
            consumers.append(Grid(plain[0], args.grid) if plain else Grid(streams[0], 4))
        save_dir = Path(args.save_images) if args.save_images else None

        # ---- one generation loop feeding every metric (this rank's share of each stream) ----
        for stream in streams:
            fed = [c for c in consumers if c.stream == stream]
            t_gen, done = time.time(), 0
            n_batches = -(-len(range(dist.rank, stream.n, dist.world)) // batch_samples(args.batch_size, stream))
            for b, (idx, images) in enumerate(generate(gen, stream, dist.rank, dist.world)):
                for consumer in fed:
                    consumer.update(images, idx)
                if save_dir is not None and stream.sizes is None:
                    _save_pngs(save_dir, idx, images)
                done += len(idx) * (len(stream.sizes) if stream.sizes else 1)
                if dist.rank == 0 and (b + 1) % max(1, n_batches // 10) == 0:
                    _log(dist, f"batch {b + 1}/{n_batches} ({done * dist.world / (time.time() - t_gen):.2f} img/s "
                               "over all ranks)")

        # ---- one gather, merge and compute on rank 0 ----
        parts = dist.gather([c.state() for c in consumers])
        if dist.rank == 0:
            for j, consumer in enumerate(consumers):
                consumer.merge(part[j] for part in parts)
            values: dict[str, float] = {}
            for metric in metrics.values():
                values.update(metric.compute())
            grid = next((c for c in consumers if isinstance(c, Grid)), None)
            _report(args, argv, dist.world, ckpt, inf, gen, prompts, metrics, values, grid, out_dir,
                    wall_s=time.time() - t_start)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming what is wrong, exit status 2
        print(f"condiff eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


def default_out_dir(ckpt: Path) -> Path:
    """`<run dir>/eval/<step_XXXXXXXX>-<time>`: beside the checkpoints, not inside one (pruning deletes those)."""
    return ckpt.parent / "eval" / f"{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _report(args, argv, world, ckpt, inf, gen, prompts, metrics: dict, values: dict, grid, out_dir: Path,
            wall_s: float) -> None:
    """Write manifest.json, report.md and grid.png (rank 0); log the results."""
    from condiff.eval import manifest
    from condiff.inference.grid import save_grid

    spec = gen.spec
    needs_samples = any(m.stream.sizes is None for m in metrics.values())
    settings = {k: v for k, v in spec.to_dict().items()
                if k not in ("sampler", "steps", "guidance", "control_guidance", "size_cond", "seed")}
    settings.update(metrics=args.metrics, guidance_given=spec.guidance, spacing=gen.spacing,
                    guidance_resolution=gen.resolved.guidance_resolution, train_resolution=gen.train_resolution,
                    weights=inf.weights, prompts=args.prompts, n_prompts=len(prompts) if prompts else None,
                    autoencoder=inf.meta.autoencoder, features=None, clip=None, ref_shards={}, ref_n={},
                    wall_s=round(wall_s, 2))
    for metric in metrics.values():
        settings.update(metric.settings())
    m = manifest.Manifest(
        checkpoint=str(ckpt), checkpoint_hash=manifest.checkpoint_hash(ckpt), sampler=spec.sampler,
        steps=spec.steps, guidance=gen.guidance, control_guidance=spec.control_guidance,
        size_cond=str(gen.size_cond), n=args.n if needs_samples else 0, seed=spec.seed, resolution=gen.resolution,
        metrics=values, reference=metrics["fid"].reference_keys() if "fid" in metrics else {},
        settings=settings, world_size=world, command=" ".join(["condiff eval", *argv]))
    manifest.save(m, out_dir)
    shown = grid.images() if grid is not None else None
    if shown is not None:
        save_grid(shown, out_dir / "grid.png", nrow=grid.nrow, record={**gen.record(), "indices": [int(i) for i in grid.ordered()[0]]})
    print("[condiff eval] results: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()), flush=True)
    print(f"[condiff eval] wrote {out_dir / 'manifest.json'}, report.md{', grid.png' if shown is not None else ''}",
          flush=True)


def _save_pngs(save_dir: Path, idx: list[int], images: torch.Tensor) -> None:
    from PIL import Image

    from condiff.io.images import to_uint8

    save_dir.mkdir(parents=True, exist_ok=True)
    for i, u8 in zip(idx, to_uint8(images)):
        Image.fromarray(u8).save(save_dir / f"{i:06d}.png")


if __name__ == "__main__":
    raise SystemExit(main())
