"""`torchrun --nproc_per_node=N -m condiff.train --config configs/<recipe>.yaml [key=value ...]`
and `condiff train ...` (the same code in one process).

Examples:
  condiff train --config configs/tiny/mmdit_ours_shapes.yaml steps=200 run_dir=runs/tiny
  torchrun --nproc_per_node=8 -m condiff.train --config configs/imagenet256/mmdit_ours.yaml
  condiff train --config configs/tiny/dit_shapes.yaml --print-config      # show the resolved config
A run resumes automatically from the newest checkpoint of `run_dir` that verifies (`resume_partial=true`
accepts one missing optimizer/RNG/EMA state, loudly). resume=false on a run_dir that holds checkpoints is
an error unless overwrite=true, which deletes them; a save never replaces an existing step directory.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from condiff.train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condiff train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/...); omitted = the built-in defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"condiff train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from condiff.io.checkpoint import RunDirInUse
    from condiff.train.loop import NonFiniteError, train

    try:
        summary = train(cfg)
    except ConfigError as e:  # found while building the run (data, world size)
        print(f"condiff train: config error: {e}", file=sys.stderr)
        return 2
    except RunDirInUse as e:
        print(f"condiff train: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"condiff train: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
