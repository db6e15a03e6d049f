"""`condiff demo`: the ten-minute CPU demo. Writes the shapes shards, trains the paper's improved mmDiT
(`mmdit-ours`, tiny, text-conditioned through the offline MiniLM encoder) and fills `runs/demo/` with

  samples.png   a grid: one row per fixed prompt, `--per-prompt` EMA samples each (DDIM + CFG), captioned
  loss.png      the training-loss curve
  report.json   steps, wall time, s/step, img/s, and the shapes alignment score (condiff.eval.align)
  metrics.jsonl, checkpoints (`step_*/`, `latest`), config.yaml: a normal training run (`condiff sample
                runs/demo` and `condiff train --config runs/demo/config.yaml` work on it; re-running
                the demo resumes it)

Design (docs/cpu-training-budget.md measured that a naive 32 px DiT does not learn the layout in
ten minutes): 16 px pixels with patch 2 (64 image tokens of 12 values each), the `demo` shapes preset
(red/blue x circle/square, two objects left/right: 8 captions), 12 text tokens (the captions' length),
the MiniLM states of the 8 captions and of "" computed ONCE (the text encoder never runs per step),
the paper's loss weighting in its EDM reading ("edm": plain epsilon MSE; App. C, see
benchmarks/RESULTS.md "Loss weighting on the shapes demo" for the comparison with Min-SNR-5 and the
former 1/sigma^2-on-epsilon default),
batch 32 and lr 1e-3 (more updates per second beat bigger batches at this budget), EMA 0.998.
`--steps` is the knob: the default fits about ten minutes on an unloaded 2-core laptop CPU;
the demo reports its own s/step so you can scale it. Intra-op threads are chosen by timing training steps
at 1, the load-based guess and all cores, re-timed every 300 steps (`condiff.train.threads.ThreadTuner`;
the history is in report.json `threads_choice`), so other work on the machine slows it less.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from condiff.diffusion.schedule import WEIGHTINGS
from condiff.train.threads import ThreadTuner, candidate_threads, free_threads, usable_cores

DEFAULT_STEPS = 3000
PRESET = "demo"
CELL = 96  # px: each 16 px sample is shown nearest-upscaled to a cell at least this wide


def demo_overrides(out: Path, args) -> dict:
    """The demo's training recipe (a normal TrainConfig; saved as runs/demo/config.yaml)."""
    from condiff.data import shapes

    prompts = shapes.class_names(shapes.get_config(PRESET))
    return {
        "run_dir": str(out),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "save_every": max(1, min(500, args.steps)),
        "keep_last": 1,
        "max_nonfinite": 20,
        "model": {
            "name": "mmdit-ours-tiny",  # depth 4, width 128, 4 heads; Eq. 1 control, noisy-replicate padding
            "conditioning": "text",
            "kwargs": {"input_size": args.resolution, "in_channels": 3, "patch_size": 2,
                       "text_dim": 384, "pooled_dim": 384, "text_len": args.text_len},
        },
        "data": {"shards": str(out / "data"), "resolution": args.resolution, "crop": "global", "flip": False,
                 "label_drop": 0.1, "control_drop": 0.1, "workers": 0, "shuffle_buffer": 1000},
        "text": {"encoder": {"kind": "minilm", "max_length": args.text_len}, "cache": 64},
        "schedule": {"weighting": args.weighting},
        "optim": {"name": "adam", "lr": args.lr, "ref_batch": args.batch_size, "betas": [0.9, 0.95],
                  "warmup_steps": 100, "grad_clip": 1.0},
        "ema": {"decay": 0.998, "warmup": 10},
        "log": {"every": 25, "progress": not args.quiet, "sample_every": args.sample_every,
                "sample_prompts": prompts, "sample_per_prompt": args.per_prompt,
                "sample_guidance": args.guidance, "sample_steps": args.sample_steps},
    }


def choose_threads(requested: int) -> tuple[dict, ThreadTuner | None]:
    """The demo's thread policy: `requested` (> 0, `--threads`) fixed, else a `ThreadTuner` over
    1, the load-based guess and all usable cores, first trying the guess."""
    import os

    cores = usable_cores()
    if requested > 0:
        torch.set_num_threads(requested)
        return {"threads": requested, "rule": "--threads", "cores": cores}, None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    guess = free_threads(cores, load)
    candidates = [guess] + [c for c in candidate_threads(cores, load) if c != guess]
    return {"cores": cores, "load_1min": round(load, 2), "first_guess": guess}, ThreadTuner(candidates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="condiff demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resolution", type=int, default=16, help="pixels (square); patch 2")
    p.add_argument("--text-len", type=int, default=12, help="text tokens (MiniLM; the demo captions have 12)")
    p.add_argument("--n", type=int, default=4096, help="shapes images written to the shards")
    p.add_argument("--per-prompt", type=int, default=8, help="samples per prompt in the grid and the score")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (Eq. 2, beta = 1)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--sample-every", type=int, default=0, help="also write EMA grids every K steps (0: only at the end)")
    p.add_argument("--weighting", default="edm", choices=WEIGHTINGS,
                   help="loss weighting (default edm: App. C's 1/sigma^2 on the denoiser error = epsilon MSE)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0, default: chosen by timing training steps, see ThreadTuner)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete an existing run in --out instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or args.batch_size < 1 or args.resolution % 2:
        p.error("--steps and --batch-size must be >= 1 and --resolution even")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: chosen by timing training steps)")
    threads, tuner = choose_threads(args.threads)  # before the demo's own work raises the load
    print("[demo] intra-op threads: " + (f"{args.threads} (--threads)" if tuner is None else
          f"timed among {tuner.candidates} every {tuner.every} steps (load {threads['load_1min']}, "
          f"{threads['cores']} cores)"), file=sys.stderr)

    from condiff.data.make_shards import write_shapes
    from condiff.inference.grid import save_grid
    from condiff.train.config import load_config
    from condiff.train.loop import Trainer, plot_loss_curve, preview_generator

    t0 = time.perf_counter()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    data_dir = out / "data"
    info_path = data_dir / "dataset.json"
    if not (info_path.is_file() and json.loads(info_path.read_text()).get("n") == args.n):
        print(f"[demo] writing {args.n} shapes images ({PRESET} preset) to {data_dir}", file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)
        info = write_shapes(str(data_dir), args.n, seed=0, preset=PRESET, shard_size=1024)
        info_path.write_text(json.dumps(info, indent=1))
    t_data = time.perf_counter() - t0

    cfg = load_config(data=demo_overrides(out, args))
    trainer = Trainer(cfg)
    if tuner is not None:
        trainer.train_step = tuner.wrap(trainer.train_step)
    prompts = list(cfg.log.sample_prompts)
    trainer.text_encoder.precompute(prompts + [""])  # the whole caption vocabulary, encoded once
    t_setup = time.perf_counter() - t0
    summary = trainer.run(final_grid=False)
    t_train = time.perf_counter() - t0 - t_setup

    # final grid and alignment score from the EMA weights (what `condiff sample` would use)
    t_s = time.perf_counter()
    from condiff.models import create

    model = create(**trainer.model_config)
    model.load_state_dict(trainer.ema.state_dict(trainer.model))
    model.eval()
    gen = preview_generator(model, trainer.schedule, cfg, text_encoder=trainer.text_encoder,
                            autoencoder=trainer.autoencoder, train_sizes=trainer.train_sizes, seed=args.seed + 1)
    images = gen.generate()
    captions = [c for c in prompts for _ in range(args.per_prompt)]
    save_grid(images, out / "samples.png", nrow=args.per_prompt, min_cell=CELL, row_captions=prompts)
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    from condiff.eval.align import score_images

    scores = score_images(images, captions)
    real_scores = score_images(torch.stack(_real_images(prompts, args.resolution)), prompts)
    t_sample = time.perf_counter() - t_s

    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps_run = summary["steps_this_run"]
    report = {
        "steps": summary["steps"],
        "steps_this_run": steps_run,
        "batch_size": cfg.batch_size,
        "wall_s": {"total": round(time.perf_counter() - t0, 1), "data": round(t_data, 1),
                   "setup": round(t_setup - t_data, 1), "train": round(t_train, 1), "sample_and_score": round(t_sample, 1)},
        "sec_per_step": round(t_train / steps_run, 4) if steps_run else None,
        "img_per_s": round(steps_run * cfg.batch_size / t_train, 1) if steps_run else None,
        "threads": torch.get_num_threads(),
        "threads_choice": threads if tuner is None else {**threads, **tuner.record()},
        "weighting": cfg.schedule.weighting,
        "seed": cfg.seed,
        "final_loss": records[-1]["loss"] if records else None,
        "alignment": scores,
        "alignment_of_real_images": real_scores,
        "prompts": prompts,
        "sampler": gen.record(),
        "files": {"grid": str(out / "samples.png"), "loss_curve": str(out / "loss.png"),
                  "checkpoint": str(out / "latest")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    line = f"[demo] {summary['steps']} steps in {report['wall_s']['total']:.0f} s"
    if steps_run:
        line += f" ({report['sec_per_step']:.3f} s/step, {report['img_per_s']} img/s on {report['threads']} threads)"
    if scores:
        line += (f"; alignment: overall {scores['overall']:.2f}, colour {scores['colour']:.2f}, "
                 f"shape {scores['shape']:.2f}, relation {scores['relation']:.2f}")
    print(line, file=sys.stderr)
    print(f"[demo] grid: {out / 'samples.png'}  loss curve: {out / 'loss.png'}  report: {out / 'report.json'}",
          file=sys.stderr)
    return 0


def _real_images(prompts: list[str], resolution: int) -> list[torch.Tensor]:
    """One training-style view (centre crop, resized) of a real shapes image per prompt: the detector's
    score on data at the demo resolution, reported beside the samples' score as the ceiling."""
    import numpy as np

    from condiff.data import shapes
    from condiff.data.transforms import CropTransform

    cfg = shapes.get_config(PRESET)
    transform = CropTransform(resolution, "center", flip_prob=0.0)
    found: dict[str, torch.Tensor] = {}
    for i in range(10_000):
        s = shapes.render(i, cfg, 0)
        if s.caption in prompts and s.caption not in found:
            found[s.caption] = transform(s.image, np.random.default_rng(0))[0]
        if len(found) == len(prompts):
            break
    return [found[c] for c in prompts]


if __name__ == "__main__":
    raise SystemExit(main())
