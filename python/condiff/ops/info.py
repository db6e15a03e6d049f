"""`condiff ops-info` / `python -m condiff.ops`: which fused-op backends are live here, and why not."""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condiff ops-info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the backends() dict as JSON")
    parser.add_argument("--selftest", action="store_true",
                        help="run every op on every live kernel backend against the reference (forward and backward); "
                             "exit 1 on a mismatch")
    args = parser.parse_args(argv)
    from condiff import ops

    if args.selftest:
        from condiff.ops import selftest

        rows = selftest.run_all()
        for op, backend, device, ok, detail in rows:
            print(f"  {op:<20} {backend:<7} {device:<7} {'ok  ' if ok else 'FAIL'}  {detail}")
        if not rows:
            print("no kernel backend is live here: every op runs the reference")
        return 0 if all(r[3] for r in rows) else 1

    state = ops.backends()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"torch {torch.__version__}  (CUDA build {torch.version.cuda}, device available: {torch.cuda.is_available()})")
    for name, s in state.items():
        print(f"  {name:<9} {'live' if s['live'] else 'off ':<4}  {s['reason']}")  # the reason says if CUDA is built in
    example = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"automatic choice for {example.device.type} tensors: {ops._select(None, example)}")
    return 0
