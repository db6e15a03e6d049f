"""Running an experiment: its training runs and evaluations as ordinary `condiff train` / `condiff eval`
processes, J at a time, resumable.

Jobs (`plan`):
  train ARM seedK   `condiff train --config RECIPE <overrides> run_dir=ROOT/NAME/ARM/seedK seed=K`; when it
                    exits 0 the runner writes run_dir/repro.json (the overrides' hash, steps, wall time). A run
                    whose repro.json carries the same hash is finished and skipped; an unfinished one resumes
                    from its checkpoints (the trainer's own resume); one whose hash differs is an error (the
                    spec changed under it: delete the run directory to retrain).
  eval ARM seedK C  `condiff eval run_dir <eval flags of condition C> --out run_dir/repro_eval/C --save-images ..`
                    after its training run; cached in repro_eval/C/repro.json (keyed by the flags and the
                    training run's repro.json), so a report re-reads it and a changed condition re-evaluates.
An arm naming another arm's run ("{run:ARM}", e.g. fine-tuning from a pre-training arm) waits for it.
A `run_of` arm's training job is its owner experiment's job (same command, directory and identity): finished
there, it is skipped here; `condiff repro run` trains missing owner runs first (`sources`), and its
evaluations are written under this experiment (ROOT/NAME/ARM/seedK/repro_eval/C).

Parallelism: J processes side by side, each with OMP_NUM_THREADS = MKL_NUM_THREADS = max(1, cores // J)
(torch reads them for its intra-op pool), cores = the CPUs this process may use. One progress bar over
the experiment, in step units: a training step counts 1 (polled from each run's metrics.jsonl), an
evaluation counts EVAL_UNITS.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from condiff.io.atomic import atomic_write_text
from condiff.repro.spec import Experiment, SpecError, data_dir, topological

EVAL_UNITS = 100
MARKER = "repro.json"


@dataclass
class Job:
    key: str  # "train ARM seedK" | "eval ARM seedK COND"
    kind: str  # "train" | "eval"
    arm: str
    seed: int
    condition: str | None
    argv: list[str]  # the command after `python -m condiff`
    run_dir: Path
    out_dir: Path  # where its marker goes (the run dir, or the eval output dir)
    deps: list[str] = field(default_factory=list)
    units: int = EVAL_UNITS
    identity: str = ""  # hash of what the job computes; its marker must carry the same

    @property
    def marker(self) -> Path:
        return self.out_dir / MARKER

    def finished(self) -> bool:
        """True when the marker records this job's identity (and, for evals, the current training run)."""
        rec = read_json(self.marker)
        return rec is not None and rec.get("identity") == self.current_identity()

    def current_identity(self) -> str:
        if self.kind == "train":
            return self.identity
        train = read_json(self.run_dir / MARKER) or {}
        return _hash([self.identity, train.get("identity"), train.get("finished_at")])


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def override_arg(key: str, value: Any) -> str:
    """`key=value` with the value written so that the trainer's YAML parsing reads it back unchanged."""
    return f"{key}={json.dumps(value)}"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_job(jobs: int) -> int:
    return max(1, cores() // max(1, jobs))


def machine() -> dict[str, Any]:
    """What the numbers were measured on (recorded in report.json and docs/REPRODUCTION.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": cores(), "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}


def owner(exp: Experiment, arm: str) -> tuple[Experiment, str]:
    """The experiment and arm that own ARM's training run (itself, unless a `run_of` arm)."""
    return exp.source(arm) or (exp, arm)


def train_argv(exp: Experiment, root: Path, arm: str, seed: int) -> list[str]:
    exp, arm = owner(exp, arm)
    over = exp.train_overrides(root, arm, seed)
    return ["train", "--config", str(exp.recipe), *(override_arg(k, v) for k, v in over.items()), "log.progress=false"]


def sources(exp: Experiment, arms: list[str]) -> dict[str, list[str]]:
    """{owner experiment name: [its arms]} whose training runs the `run_of` arms among `arms` share."""
    out: dict[str, list[str]] = {}
    for arm in arms:
        src = exp.source(arm)
        if src and src[1] not in out.setdefault(src[0].name, []):
            out[src[0].name].append(src[1])
    return out


def resolved_configs(exp: Experiment, root: Path, arms: list[str] | None = None) -> dict[str, dict]:
    """{arm: its training config as the trainer resolves it} (`condiff train --print-config`, one process per
    arm, side by side); a bad override is a SpecError naming the spec, the arm and the trainer's message."""
    procs = {arm: subprocess.Popen([sys.executable, "-m", "condiff", *train_argv(exp, root, arm, 0), "--print-config"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(1))
             for arm in (arms or exp.arms)}
    out = {}
    for arm, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            msg = (stderr.strip().splitlines() or ["(no message)"])[-1]
            raise SpecError(f"{exp.path}: arms.{arm}: the training config does not load: {msg}")
        out[arm] = yaml.safe_load(stdout)
    return out


def with_deps(exp: Experiment, arms: list[str]) -> list[str]:
    """`arms` plus every arm they depend on, in dependency order; SpecError for an unknown arm."""
    for a in arms:
        if a not in exp.arms:
            raise SpecError(f"--arms {a!r}: not an arm of {exp.path} ({', '.join(exp.arms)})")
    need: set[str] = set()

    def add(a: str) -> None:
        need.add(a)
        for d in exp.arms[a].deps:
            add(d)

    for a in arms:
        add(a)
    return [a for a in topological(exp.arms) if a in need]


def plan(exp: Experiment, root: Path, seeds: int, steps: dict[str, int], arms: list[str] | None = None) -> list[Job]:
    """Every job of the experiment (or of `arms` and what they depend on) in dependency order; `steps` =
    {arm: training steps} (progress units)."""
    jobs: list[Job] = []
    for seed in range(seeds):  # seed by seed (a partial experiment has whole seeds), trainings first
        evals: list[Job] = []
        for arm in with_deps(exp, arms or list(exp.arms)):
            run_dir = exp.run_dir(root, arm, seed)
            argv = train_argv(exp, root, arm, seed)
            deps = [f"train {d} seed{seed}" for d in exp.arms[arm].deps]
            identity = _hash([owner(exp, arm)[0].recipe.read_text(), argv[3:]])  # the recipe's text, not its path
            jobs.append(Job(f"train {arm} seed{seed}", "train", arm, seed, None, argv, run_dir, run_dir, deps,
                            units=steps[arm], identity=identity))
            if not exp.arms[arm].evaluate:
                continue
            for cond in exp.conditions:
                out = exp.arm_dir(root, arm, seed) / "repro_eval" / cond
                eargv = ["eval", str(run_dir), *exp.eval_argv(cond), "--out", str(out),
                         "--save-images", str(out / "images")]
                evals.append(Job(f"eval {arm} seed{seed} {cond}", "eval", arm, seed, cond, eargv, run_dir, out,
                                 [f"train {arm} seed{seed}"], identity=_hash(eargv)))
        jobs += evals
    return jobs


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def ensure_data(exp: Experiment, root: Path, log=print) -> None:
    """Write the experiment's shapes set (once; shared by experiments with the same `data`), atomically."""
    if exp.data is None:
        return
    import shutil

    from condiff.data.make_shards import write_shapes

    out = data_dir(root, exp.data)
    if (out / "dataset.json").is_file():
        return
    log(f"[repro] writing the shapes set {exp.data} to {out}")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in exp.data["set"].items()}
    write_shapes(str(tmp), exp.data["n"], seed=exp.data["seed"], preset=exp.data["preset"], **overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def check_markers(jobs: list[Job]) -> None:
    """A training run finished under other settings is an error (it would silently mix two recipes)."""
    for job in jobs:
        rec = read_json(job.marker)
        if job.kind == "train" and rec is not None and rec.get("identity") != job.identity:
            raise SpecError(f"{job.run_dir} was trained with other settings than the spec now gives "
                            f"({job.marker} records another command); delete that directory to retrain it")


def _progress(job: Job) -> int:
    """Units done by a job: training steps from its metrics.jsonl (last record), or all once finished."""
    if job.finished():
        return job.units
    if job.kind != "train":
        return 0
    try:
        with open(job.run_dir / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return min(job.units, int(json.loads(last)["step"]))
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def execute(jobs: list[Job], parallel: int, log=print, progress: bool = True, poll_s: float = 2.0,
            launcher: list[str] | None = None) -> dict[str, Any]:
    """Run the unfinished jobs, `parallel` at a time, in order as their dependencies finish, each as
    `launcher + job.argv` (default `python -m condiff`). Returns {"failed": [keys], "skipped": [keys],
    "ran": [keys], "wall_s": ..., "threads": ...}. A failed job's log is named; jobs that depend on it are
    skipped, the others still run."""
    launcher = launcher or [sys.executable, "-m", "condiff"]
    from tqdm.auto import tqdm

    threads = threads_per_job(parallel)
    env = _env(threads)
    todo = [j for j in jobs if not j.finished()]
    done_keys = {j.key for j in jobs if j not in todo}
    bar = tqdm(total=sum(j.units for j in jobs), initial=sum(j.units for j in jobs if j.key in done_keys),
               desc="repro", unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    running: dict[str, tuple[Job, subprocess.Popen, float, Any]] = {}
    failed, skipped, ran = [], [], []
    interrupted = False
    t0 = time.perf_counter()
    try:
        while (todo or running) and not interrupted:
            for job in list(todo):
                if len(running) >= parallel:
                    break
                if any(d in failed or d in skipped for d in job.deps):
                    todo.remove(job)
                    skipped.append(job.key)
                    log(f"[repro] skip {job.key}: it needs {', '.join(d for d in job.deps if d in failed + skipped)}")
                    continue
                if not all(d in done_keys for d in job.deps):
                    continue
                todo.remove(job)
                job.out_dir.mkdir(parents=True, exist_ok=True)
                logf = open(job.out_dir / f"repro_{job.kind}.log", "a")
                proc = subprocess.Popen([*launcher, *job.argv], stdout=logf,
                                        stderr=subprocess.STDOUT, env=env)
                running[job.key] = (job, proc, time.perf_counter(), logf)
            try:
                time.sleep(poll_s)
            except KeyboardInterrupt:  # Ctrl-C: stop the running jobs (checkpoints stay), report what finished
                interrupted = True
                log(f"[repro] interrupted: stopping {', '.join(running) or 'nothing'}; run again to resume")
            for key, (job, proc, start, logf) in list(running.items()):
                rc = proc.poll()
                if rc is None and not interrupted:
                    continue
                if interrupted and rc != 0:  # stopped (by us, or by the same Ctrl-C): neither finished nor failed
                    proc.terminate()
                    proc.wait()
                    logf.close()
                    del running[key]
                    continue
                logf.close()
                del running[key]
                if rc == 0:
                    _write_marker(job, time.perf_counter() - start, threads)
                    done_keys.add(key)
                    ran.append(key)
                else:
                    failed.append(key)
                    log(f"[repro] FAILED {key} (exit {rc}); log: {job.out_dir / f'repro_{job.kind}.log'}")
            if progress:
                units = sum(_progress(j) if j.key not in done_keys else j.units for j in jobs)
                bar.n = units
                bar.set_postfix_str(f"{len(running)} running, {len(failed)} failed", refresh=False)
                bar.refresh()
    finally:
        for job, proc, _, logf in running.values():  # interrupted: stop our children, keep their checkpoints
            proc.terminate()
            proc.wait()
            logf.close()
        bar.close()
    return {"failed": failed, "skipped": skipped, "ran": ran, "wall_s": time.perf_counter() - t0, "threads": threads,
            "interrupted": interrupted}


def _write_marker(job: Job, wall_s: float, threads: int) -> None:
    rec: dict[str, Any] = {"job": job.key, "command": ["condiff", *job.argv], "wall_s": round(wall_s, 1),
                           "threads": threads, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if job.kind == "eval":
        manifest = read_json(job.out_dir / "manifest.json")
        if manifest is None:
            raise SpecError(f"{job.key}: `condiff eval` exited 0 but wrote no {job.out_dir / 'manifest.json'}")
        rec["metrics"] = manifest["metrics"]
        rec["checkpoint"] = manifest["checkpoint"]
    rec["identity"] = job.current_identity()  # evals: after the training marker it depends on
    atomic_write_text(job.marker, json.dumps(rec, indent=1))
