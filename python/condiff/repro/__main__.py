"""`condiff repro`: the reproduction suite (experiment specs in configs/repro/, see `condiff.repro.spec`).

    condiff repro list                                   # the experiments, their claims and how far each got
    condiff repro run flip [--seeds 3] [--jobs 2]        # train + evaluate every arm and seed (resumable), report
    condiff repro report flip                            # re-write runs/repro/flip/report.{md,json} + PNGs
    condiff repro report --docs                          # docs/REPRODUCTION.md from every experiment's report

Runs are ordinary `condiff train` runs under ROOT/NAME/ARM/seedK (default ROOT runs/repro): interrupt and
re-run to resume; a finished training run or evaluation is not repeated.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from condiff.io.atomic import atomic_write_text
from condiff.repro.spec import SpecError, default_configs, list_specs, load_spec, missing_configs_hint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condiff repro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/repro", help="where runs and reports go (default runs/repro)")
    p.add_argument("--configs", default=None,
                   help="directory of experiment specs (default: ./configs/repro, else the configs/repro of the "
                        "clone condiff was imported from)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="train and evaluate an experiment, then write its report")
    r.add_argument("name", help="experiment name (configs/repro/NAME.yaml) or a spec path")
    r.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the spec's)")
    r.add_argument("--jobs", type=int, default=1, help="processes side by side (threads each: cores // jobs)")
    r.add_argument("--arms", default=None,
                   help="comma list: run only these arms (and the arms they start from); the report marks the rest")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = sub.add_parser("report", help="write the report of one experiment (or of every one that has runs)")
    rep.add_argument("name", nargs="?", default=None)
    rep.add_argument("--docs", nargs="?", const="docs/REPRODUCTION.md", default=None, metavar="PATH",
                     help="also write the collected document (default docs/REPRODUCTION.md)")
    return p


def cmd_list(root: Path, configs: Path) -> int:
    from condiff.repro.runner import read_json

    specs = list_specs(configs)
    if not specs:
        print(missing_configs_hint(configs), file=sys.stderr)
        return 1
    for path in specs:
        exp = load_spec(path, configs)
        rep = read_json(root / exp.name / "report.json")
        status = ("report: " + ", ".join(c["verdict"] for c in rep["claims"])) if rep else "no report"
        print(f"{exp.name:<14} {exp.paper.get('source', ''):<18} {len(exp.arms)} arms x {exp.seeds} seeds  "
              f"{exp.title}  [{status}]")
    return 0


def cmd_run(args, root: Path, configs: Path) -> int:
    from condiff.repro import report, runner

    exp = load_spec(args.name, configs)
    seeds = args.seeds or exp.seeds
    if seeds < 1 or args.jobs < 1:
        raise SpecError("--seeds and --jobs must be >= 1")
    arms = runner.with_deps(exp, [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else list(exp.arms))
    for name, src_arms in runner.sources(exp, arms).items():  # shared training runs: trained by their owner
        print(f"[repro] {exp.name}: training runs shared with {name} ({', '.join(src_arms)})", file=sys.stderr)
        rc = cmd_run(argparse.Namespace(name=name, seeds=seeds, jobs=args.jobs, arms=",".join(src_arms),
                                        no_progress=args.no_progress, train_only=exp.name), root, configs)
        if rc != 0:
            return rc
    print(f"[repro] {exp.name}: checking the {len(arms)} arms' training configs", file=sys.stderr)
    steps = {arm: int(cfg["steps"]) for arm, cfg in runner.resolved_configs(exp, root, arms).items()}
    runner.ensure_data(exp, root, log=lambda m: print(m, file=sys.stderr))
    jobs = runner.plan(exp, root, seeds, steps, arms)
    train_only = getattr(args, "train_only", None)  # the experiment an owner's training runs are for
    if train_only:  # its evaluations are not needed
        jobs = [j for j in jobs if j.kind == "train"]
    runner.check_markers(jobs)
    todo = [j for j in jobs if not j.finished()]
    print(f"[repro] {exp.name}: {len(jobs)} jobs ({len(jobs) - len(todo)} already finished), {args.jobs} at a time, "
          f"{runner.threads_per_job(args.jobs)} threads each", file=sys.stderr)
    # SIGTERM, and SIGINT even where the shell started us with it ignored (a background job), stop the jobs
    # cleanly: the runner turns KeyboardInterrupt into "interrupted" and still writes the record and report
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.time()
    result = runner.execute(jobs, args.jobs, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress)
    command = f"condiff repro run {exp.name} --seeds {seeds} --jobs {args.jobs}" + (f" --arms {args.arms}" if args.arms else "")
    command += f" (trainings only, for {train_only})" if train_only else ""
    prev = runner.read_json(root / exp.name / "run.json") or {}
    record = {"command": command, "seeds": seeds, "jobs": args.jobs, "threads": result["threads"],
              "wall_s": round(time.time() - t0, 1), "total_wall_s": round(prev.get("total_wall_s", 0) + time.time() - t0, 1),
              "machine": runner.machine(), "ran": result["ran"], "failed": result["failed"], "skipped": result["skipped"],
              "interrupted": result["interrupted"],
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if result["ran"] or result["failed"] or not prev:  # a run that found everything finished keeps the record
        atomic_write_text(root / exp.name / "run.json", json.dumps(record, indent=1))
    path = report.write(exp, root)
    print(f"[repro] report: {path}", file=sys.stderr)
    if result["interrupted"]:
        return 130
    if result["failed"] or result["skipped"]:
        print(f"[repro] {len(result['failed'])} jobs failed, {len(result['skipped'])} skipped: "
              + ", ".join(result["failed"] + result["skipped"]), file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_report(args, root: Path, configs: Path) -> int:
    from condiff.repro import report

    names = [args.name] if args.name else [p.stem for p in list_specs(configs) if (root / p.stem).is_dir()]
    for name in names:
        print(report.write(load_spec(name, configs), root))
    if args.docs:
        print(report.docs(root, Path(args.docs), configs))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    root, configs = Path(args.root), Path(args.configs) if args.configs else default_configs()
    try:
        if args.command == "list":
            return cmd_list(root, configs)
        if args.command == "run":
            return cmd_run(args, root, configs)
        return cmd_report(args, root, configs)
    except SpecError as e:
        print(f"condiff repro: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
