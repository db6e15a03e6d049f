"""The `condiff` command: one entry point, one sub-command per job.

Each sub-command lives in the module that owns the job and exposes `main(argv: list[str]) -> int`;
this file only dispatches, importing the module lazily so that `condiff ops-info` does not pay for
importing the trainer.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ops-info": ("condiff.ops.info:main", "which fused-op backends are live on this machine"),
    "flops": ("condiff.reports.table_a1:main", "params and GFLOPs of every backbone beside the paper's Table A1"),
    "convert": ("condiff.interop.cli:main", "convert DiT / diffusers checkpoints to and from condiff"),
    "sample": ("condiff.sample:main", "sample a PNG grid from a checkpoint or a zoo name"),
    "make-shards": ("condiff.data.make_shards:main", "write webdataset shards (image folder, CSV/JSONL, shapes)"),
    "precompute": ("condiff.data.precompute:main", "encode shards into latent (and text-state) shards"),
    "train": ("condiff.train.__main__:main", "train a model from a YAML recipe (single process)"),
    "demo": ("condiff.demo:main", "ten-minute CPU demo: shapes shards, tiny mmDiT-ours, samples"),
    "ema": ("condiff.io.phema:main", "reconstruct the EMA of any length from a run's snapshots (EDM2)"),
    "eval": ("condiff.eval.__main__:main", "FID / CLIP / LPIPS / shapes alignment with a manifest"),
    "repro": ("condiff.repro.__main__:main", "reproduce the paper's findings at toy scale (configs/repro/)"),
    "align": ("condiff.eval.align:main", "validate the shapes-alignment detector on rendered shapes data"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: condiff <command> [options]\n\ncommands:\n{rows}\n\n`condiff <command> --help` for details."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"condiff: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
