"""`condiff convert`: the command line over the format modules, and the writers of condiff checkpoints and
diffusers model directories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import Tensor, nn

from condiff.interop.diffusers import condiff_to_diffusers, diffusers_to_condiff, read_diffusers_dir
from condiff.interop.dit_original import load_facebook_dit


# The DDPM schedule each source was trained with (condiff.diffusion.Schedule fields); SD3 is a rectified-flow
# model, for which no DDPM schedule applies: the paper's pinned schedule is stored and the note says so.
SOURCE_SCHEDULES = {
    "facebookresearch/DiT": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    "DiTTransformer2DModel": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    "PixArtTransformer2DModel": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    "SD3Transformer2DModel": None,
}


def _write_condiff(out: Path, model: nn.Module, source: str, schedule: dict | None, force: bool = False) -> Path:
    """Write the model as checkpoint step 0 of run directory `out`; a directory that already holds
    checkpoints is an error unless `force` (a later `condiff train` there would resume from step 0)."""
    from condiff.diffusion import Schedule
    from condiff.io.checkpoint import CheckpointMeta, list_checkpoints, save_checkpoint

    existing = list_checkpoints(out)
    if existing and not force:
        raise FileExistsError(f"{out} already holds checkpoints (newest: {existing[-1].name}); converting into it "
                              f"would repoint `latest` to step 0. Choose an empty directory or pass --force")

    sched = Schedule(**schedule) if schedule else Schedule()
    note = ("DDPM schedule of the source" if schedule else
            "the source is not a DDPM model (rectified flow); the stored schedule is condiff's default")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = CheckpointMeta(model=model.config, schedule=sched.to_dict(), base_size=model.config.get("base_size"),
                          converted_from=dict(source=source, schedule_note=note))
    return save_checkpoint(out, 0, model_state=state, ema_state=state, meta=meta, overwrite=force)


def _write_diffusers_dir(out: Path, class_name: str, cfg: dict, state: dict[str, Tensor]) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors atomically (temporary dir, then rename)."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "diffusion_pytorch_model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"_class_name": class_name, **cfg}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condiff convert", description="Convert DiT / diffusers checkpoints to "
                                     "and from condiff checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dit-original", help="facebookresearch/DiT .pt checkpoint -> condiff checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="run directory to write (step_00000000/ inside)")
    p.add_argument("--keep-sigma", action="store_true", help="keep the learned-sigma channels (learn_sigma=True)")
    p.add_argument("--num-heads", type=int, default=None, help="heads, if the width is not one of DiT's configs")
    p.add_argument("--raw-weights", action="store_true", help="training checkpoints: load 'model' instead of 'ema'")
    p.add_argument("--no-ema", dest="raw_weights", action="store_true", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--force", action="store_true", help="write into a run directory that already holds checkpoints")
    p = sub.add_parser("from-diffusers", help="diffusers model directory -> condiff checkpoint")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path, help="run directory to write (step_00000000/ inside)")
    p.add_argument("--force", action="store_true", help="write into a run directory that already holds checkpoints")
    p = sub.add_parser("to-diffusers", help="condiff checkpoint (or run directory) -> diffusers model directory")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="directory to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--raw-weights", action="store_true", help="convert the raw weights instead of the EMA weights")
    p.add_argument("--raw", dest="raw_weights", action="store_true", help=argparse.SUPPRESS)  # old spelling
    args = parser.parse_args(argv)
    from condiff.models import create

    try:
        if args.command == "dit-original":
            model = load_facebook_dit(args.checkpoint, args.keep_sigma, args.num_heads, use_ema=not args.raw_weights)
            ckpt = _write_condiff(args.out, model, "facebookresearch/DiT", SOURCE_SCHEDULES["facebookresearch/DiT"],
                                  args.force)
        elif args.command == "from-diffusers":
            class_name, cfg, state = read_diffusers_dir(args.model_dir)
            name, conditioning, kwargs, sd = diffusers_to_condiff(class_name, cfg, state)
            model = create(name, conditioning, **kwargs)
            model.load_state_dict(sd)
            ckpt = _write_condiff(args.out, model, class_name, SOURCE_SCHEDULES.get(class_name), args.force)
        else:
            from condiff.io.checkpoint import load_model, resolve_checkpoint

            model = load_model(resolve_checkpoint(args.checkpoint), "model" if args.raw_weights else "ema")[0]
            class_name, cfg, state = condiff_to_diffusers(model)
            ckpt = _write_diffusers_dir(args.out, class_name, cfg, state)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"condiff convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {ckpt}")
    return 0
