"""`condiff repro`: spec validation, the statistics (hand-computed intervals), verdicts, and the runner end
to end on a 2-arm, few-step experiment (train, evaluate, report, resume)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from condiff.repro import stats
from condiff.repro.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "mmdit_ours.yaml"


def spec_dict(**over) -> dict:
    d = {
        "title": "toy",
        "paper": {"source": "Table X", "statement": "B beats A"},
        "recipe": str(TINY),
        "data": {"preset": "demo", "n": 32, "seed": 0},
        "overrides": {"steps": 2, "batch_size": 4, "save_every": 2, "keep_last": 1, "data": {"workers": 0},
                      "optim": {"warmup_steps": 0}, "log": {"sample_every": 0},
                      "model": {"kwargs": {"depth": 1, "hidden_size": 32, "num_heads": 2}}},
        "seeds": 1,
        "reference": "a",
        "arms": {"a": {"label": "arm A", "overrides": {"data.flip": False}},
                 "b": {"label": "arm B", "overrides": {"data.flip": True}}},
        "eval": {"metrics": "align", "prompts": "shapes:demo", "n": 8, "steps": 1, "batch_size": 8, "guidance": 2.0,
                 "conditions": {"plain": {}, "mirrored": {"flip": 1}}},
        "claims": [{"name": "b above a", "metric": "plain/align/colour", "arm": "b", "against": "a",
                    "direction": "higher"},
                   {"name": "flip lowers relation", "metric": "mirrored/align/relation", "arm": "b",
                    "against_metric": "plain/align/relation", "direction": "lower"}],
    }
    d.update(over)
    return d


def write_spec(tmp_path: Path, d: dict, name: str = "toy") -> Path:
    p = tmp_path / "configs" / f"{name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# ------------------------------------------------------------------------------------------ statistics
def test_t_interval_hand_computed():
    # x = 1, 2, 3, 4: mean 2.5, s = sqrt(5/3) = 1.2910, t_{0.975,3} = 3.182446, half = 3.182446 * 1.2910 / 2
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert iv.mean == 2.5 and iv.n == 4 and iv.method == "t"
    assert iv.lo == pytest.approx(2.5 - half, abs=1e-9) and iv.hi == pytest.approx(2.5 + half, abs=1e-9)
    assert (iv.lo, iv.hi) == pytest.approx((0.4457, 4.5543), abs=1e-4)
    one = stats.t_interval([0.7])
    assert one.mean == 0.7 and one.lo is None and one.hi is None


def test_difference_paired_by_seed_and_welch():
    a, b = {0: 0.9, 1: 0.8, 2: 1.0}, {0: 0.5, 1: 0.6, 2: 0.4}
    d = stats.difference(a, b)  # d_k = 0.4, 0.2, 0.6: mean 0.4, s = 0.2, t_{0.975,2} = 4.302653
    assert d.method == "paired t" and d.mean == pytest.approx(0.4)
    assert d.hi - d.mean == pytest.approx(4.302652729911275 * 0.2 / math.sqrt(3), abs=1e-9)
    w = stats.difference({0: 1.0, 1: 2.0, 2: 3.0}, {5: 1.0, 6: 1.0, 7: 4.0})  # different seeds: Welch
    # var_a/n = 1/3, var_b/n = 3/3 = 1; se = sqrt(4/3); nu = (4/3)^2 / ((1/3)^2/2 + 1/2) = 3.2
    assert w.method == "welch t" and w.mean == pytest.approx(0.0)
    from scipy.stats import t

    assert w.hi == pytest.approx(t.ppf(0.975, 3.2) * math.sqrt(4 / 3), abs=1e-9)


@pytest.mark.parametrize("lo,hi,direction,expected", [
    (0.1, 0.3, "higher", "reproduced"),
    (-0.3, -0.1, "higher", "not reproduced"),
    (-0.1, 0.3, "higher", "inconclusive"),
    (-0.3, -0.1, "lower", "reproduced"),
    (0.1, 0.3, "lower", "not reproduced"),
    (-0.2, 0.05, "lower", "inconclusive"),
    (None, None, "higher", "inconclusive"),
])
def test_verdict(lo, hi, direction, expected):
    mean = 0.0 if lo is None else (lo + hi) / 2
    assert stats.verdict(stats.Interval(mean, lo, hi, 3, "paired t"), direction) == expected


# ------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("mutate,key", [
    (lambda d: d.pop("recipe"), "recipe"),
    (lambda d: d.update(reference="zzz"), "reference"),
    (lambda d: d["arms"]["b"].update(colour="red"), "arms.b.colour"),
    (lambda d: d["eval"].update(bogus=1), "eval.bogus"),
    (lambda d: d["eval"]["conditions"]["plain"].update(flipp=1), "eval.conditions.plain.flipp"),
    (lambda d: d["claims"][0].update(direction="up"), "claims[0].direction"),
    (lambda d: d["claims"][0].update(metric="nocond/align/colour"), "claims[0].metric"),
    (lambda d: d["claims"][0].update(arm="c"), "claims[0].arm"),
    (lambda d: d["arms"]["b"]["overrides"].update(init_from="{run:nope}"), "arms.b.overrides"),
    (lambda d: d["arms"]["a"]["overrides"].update(run_dir="x"), "arms.a.overrides.run_dir"),
    (lambda d: d.update(seeds=0), "seeds"),
    (lambda d: d.update(extra=1), "extra"),
])
def test_spec_errors_name_file_and_key(tmp_path, mutate, key):
    d = spec_dict()
    mutate(d)
    path = write_spec(tmp_path, d)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_spec_cycle_and_dependency_order(tmp_path):
    from condiff.repro.spec import topological

    d = spec_dict()
    d["arms"] = {"b": {"overrides": {"init_from": "{run:pre}"}}, "pre": {"eval": False}, "a": {}}
    exp = load_spec(write_spec(tmp_path, d))
    assert exp.arms["b"].deps == ("pre",) and topological(exp.arms) == ["pre", "b", "a"]
    over = exp.train_overrides(Path("R"), "b", 3)
    assert over["init_from"] == str(Path("R/toy/pre/seed3")) and over["run_dir"] == str(Path("R/toy/b/seed3"))
    from condiff.repro.runner import plan, with_deps

    assert with_deps(exp, ["b"]) == ["pre", "b"]
    assert [j.key for j in plan(exp, Path("R"), 1, {"pre": 1, "b": 1}, ["b"])][:2] == ["train pre seed0", "train b seed0"]
    with pytest.raises(SpecError, match="--arms 'zz'"):
        with_deps(exp, ["zz"])
    d["arms"]["pre"]["overrides"] = {"init_from": "{run:b}"}
    with pytest.raises(SpecError, match="circular"):
        load_spec(write_spec(tmp_path, d))


def test_every_repo_spec_loads():
    from condiff.repro.spec import list_specs

    specs = list_specs(ROOT / "configs" / "repro")
    assert specs, "no experiment specs under configs/repro"
    for p in specs:
        exp = load_spec(p)
        assert exp.claims, f"{p}: an experiment tests at least one claim"


def test_eval_argv_and_override_quoting(tmp_path):
    from condiff.repro.runner import override_arg

    exp = load_spec(write_spec(tmp_path, spec_dict()))
    argv = exp.eval_argv("mirrored")
    assert argv[argv.index("--flip") + 1] == "1" and argv[argv.index("--metrics") + 1] == "align"
    assert override_arg("data.control_fields", ["crop", "size"]) == 'data.control_fields=["crop", "size"]'
    assert override_arg("x", "1") == 'x="1"'  # a string stays a string through the trainer's YAML parsing
    assert yaml.safe_load(override_arg("x", 1e-3).split("=", 1)[1]) == 1e-3


# ------------------------------------------------------------------------------------------ runner
def _repro(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "condiff", "repro", "--root", str(tmp_path / "runs"),
                           "--configs", str(tmp_path / "configs"), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


# a stand-in for `python -m condiff` (no torch): `train` writes metrics.jsonl, `eval` a manifest whose
# align/relation is VALUES[arm][seed] (minus 0.5 under --flip 1) and 8 tiny PNGs; every call is counted
FAKE_CONDIFF = """
import json, pathlib, sys
argv = sys.argv[1:]
with open(sys.argv[0] + ".calls", "a") as f:
    f.write(" ".join(argv[:2]) + "\\n")
VALUES = {"a": [0.5, 0.6, 0.7], "b": [0.9, 0.8, 1.0]}
if argv[0] == "train":
    over = dict(a.split("=", 1) for a in argv[3:] if "=" in a)
    run = pathlib.Path(json.loads(over["run_dir"]))
    if "broken" in str(run):
        sys.exit(1)
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2}) + "\\n")
else:
    from PIL import Image
    run, out = pathlib.Path(argv[1]), pathlib.Path(argv[argv.index("--out") + 1])
    value = VALUES[run.parent.name][int(run.name[4:])] - (0.5 if "--flip" in argv else 0.0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.new("RGB", (4, 4), (30 * i, 0, 0)).save(out / "images" / f"{i:06d}.png")
    (out / "manifest.json").write_text(json.dumps({"metrics": {"align/relation": value, "align/n": 8.0},
                                                   "checkpoint": str(run)}))
"""


def test_runner_schedules_resumes_and_reports_fast(tmp_path):
    """The runner and the report with a stand-in for `condiff` (fast): dependencies, J = 2, a failing job
    skipping its dependants only, resume running nothing, and the report's intervals and verdicts against
    hand-computed values."""
    from condiff.repro import report, runner

    d = spec_dict(seeds=3)
    d["arms"]["broken"] = {"overrides": {"init_from": "{run:a}"}}
    exp = load_spec(write_spec(tmp_path, d))
    fake = tmp_path / "fake_condiff.py"
    fake.write_text(FAKE_CONDIFF)
    root = tmp_path / "runs"
    jobs = runner.plan(exp, root, 3, {"a": 2, "b": 2, "broken": 2})
    assert len(jobs) == 3 * (3 + 3 * 2)  # per seed: 3 trainings, 3 arms x 2 conditions of evaluation
    assert jobs[2].key == "train broken seed0" and jobs[2].deps == ["train a seed0"]
    res = runner.execute(jobs, 2, log=lambda m: None, progress=False, poll_s=0.05,
                         launcher=[sys.executable, str(fake)])
    assert sorted(res["failed"]) == [f"train broken seed{s}" for s in range(3)]
    assert sorted(res["skipped"]) == sorted(f"eval broken seed{s} {c}" for s in range(3) for c in ("plain", "mirrored"))
    assert len(res["ran"]) == 3 * (2 + 4)
    calls = (tmp_path / "fake_condiff.py.calls").read_text().splitlines()
    assert len(calls) == 3 * (3 + 4)

    again = runner.execute(runner.plan(exp, root, 3, {"a": 2, "b": 2, "broken": 2}), 2, log=lambda m: None,
                           progress=False, poll_s=0.05, launcher=[sys.executable, str(fake)])
    assert again["ran"] == [] and len(again["failed"]) == 3  # only the failed trainings are retried
    assert len((tmp_path / "fake_condiff.py.calls").read_text().splitlines()) == len(calls) + 3

    report.write(exp, root)
    rep = json.loads((root / "toy" / "report.json").read_text())
    rel = rep["arms"]["b"]["metrics"]["plain/align/relation"]
    assert rel["per_seed"] == {"0": 0.9, "1": 0.8, "2": 1.0} and rel["mean"] == pytest.approx(0.9)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # s = 0.1 over 3 seeds
    assert (rel["lo"], rel["hi"]) == pytest.approx((0.9 - half, 0.9 + half))
    diff = rep["differences"]["b"]["plain/align/relation"]  # paired: 0.4, 0.2, 0.3
    assert diff["method"] == "paired t" and diff["mean"] == pytest.approx(0.3)
    assert (diff["lo"], diff["hi"]) == pytest.approx((0.3 - half, 0.3 + half))
    assert "plain/align/n" not in rep["arms"]["a"]["metrics"]  # counts are not results
    assert "broken" not in rep["arms"] or not rep["arms"]["broken"]["metrics"]
    c_colour, c_flip = rep["claims"]
    assert c_colour["verdict"] == "not run"  # no align/colour in these manifests
    assert c_flip["difference"]["mean"] == pytest.approx(-0.5) and c_flip["verdict"] == "reproduced"
    assert rep["files"]["grids"] == ["grids/plain.png", "grids/mirrored.png"]
    assert rep["files"]["plots"] == ["plots/claim2.png"]
    md = (root / "toy" / "report.md").read_text()
    assert "**reproduced**" in md and "paired t" in md and "0.300 [" in md


def test_runner_interrupt_stops_jobs_without_failing_them(tmp_path):
    import signal

    from condiff.repro import runner

    exp = load_spec(write_spec(tmp_path, spec_dict()))
    jobs = runner.plan(exp, tmp_path / "runs", 1, {"a": 2, "b": 2})

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # Ctrl-C while both trainings run
    try:
        res = runner.execute(jobs, 2, log=lambda m: None, progress=False, poll_s=0.05,
                             launcher=[sys.executable, "-c", "import time; time.sleep(60)"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert res["interrupted"] and res["failed"] == [] and res["ran"] == []
    assert not any(j.finished() for j in jobs)


@pytest.mark.slow  # eight fresh interpreters importing torch: ~3-4 min on the shared 2-core machine
def test_runner_end_to_end_resume_and_report(tmp_path):
    from condiff.repro import runner

    write_spec(tmp_path, spec_dict())
    out = _repro(tmp_path, "run", "toy", "--jobs", "2", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "runs" / "toy"
    for arm in ("a", "b"):
        marker = json.loads((runs / arm / "seed0" / "repro.json").read_text())
        assert marker["command"][:2] == ["condiff", "train"] and marker["threads"] == runner.threads_per_job(2)
        assert (runs / arm / "seed0" / "latest").exists()
        for cond in ("plain", "mirrored"):
            ev = json.loads((runs / arm / "seed0" / "repro_eval" / cond / "repro.json").read_text())
            assert 0.0 <= ev["metrics"]["align/relation"] <= 1.0
    rep = json.loads((runs / "report.json").read_text())
    assert set(rep) >= {"arms", "differences", "claims", "statistics", "compute", "run", "seeds", "files"}
    assert rep["seeds"] == [0] and set(rep["arms"]) == {"a", "b"}
    assert set(rep["arms"]["b"]["metrics"]["plain/align/relation"]) >= {"mean", "lo", "hi", "n", "per_seed"}
    assert "plain/align/colour" in rep["differences"]["b"]
    # one seed: no interval, so every claim is inconclusive (never a verdict without a CI)
    assert [c["verdict"] for c in rep["claims"]] == ["inconclusive", "inconclusive"]
    assert rep["files"]["grids"] == ["grids/plain.png", "grids/mirrored.png"]
    for f in rep["files"]["grids"] + rep["files"]["plots"]:
        assert (runs / f).is_file()
    assert "## Claims" in (runs / "report.md").read_text()

    # resume: nothing is re-run, the record of the run that did the work is kept
    record = (runs / "run.json").read_text()
    again = _repro(tmp_path, "run", "toy", "--no-progress")
    assert again.returncode == 0 and "6 jobs (6 already finished)" in again.stderr, again.stderr
    assert (runs / "run.json").read_text() == record and json.loads(record)["ran"]

    # a changed arm under a finished run is refused, naming the run directory
    from condiff.repro.report import docs

    d = spec_dict()
    d["arms"]["a"]["overrides"]["data.flip"] = True
    exp = load_spec(write_spec(tmp_path, d))
    with pytest.raises(SpecError, match=str(runs / "a" / "seed0")):
        runner.check_markers(runner.plan(exp, tmp_path / "runs", 1, {"a": 2, "b": 2}))

    # the docs generator: the measured experiment with its verdicts and command
    write_spec(tmp_path, spec_dict())
    out = docs(tmp_path / "runs", tmp_path / "docs" / "REPRODUCTION.md", tmp_path / "configs")
    text = out.read_text()
    assert "condiff repro run toy" in text and "inconclusive" in text
    assert (tmp_path / "docs" / "repro" / "toy_plain.png").is_file()


def test_runner_reports_a_bad_override(tmp_path):
    from condiff.repro.runner import resolved_configs

    d = spec_dict()
    d["arms"]["b"]["overrides"] = {"optim.lrr": 1.0}
    with pytest.raises(SpecError, match=r"arms\.b.*optim\.lrr"):
        resolved_configs(load_spec(write_spec(tmp_path, d)), tmp_path / "runs")


def test_docs_keep_measured_sections_without_their_runs(tmp_path):
    """A tree without runs/repro/NAME keeps NAME's measured section from the existing REPRODUCTION.md; a spec
    neither measured here nor before is marked not yet run."""
    from condiff.repro.report import docs, measured_sections

    write_spec(tmp_path, spec_dict())
    write_spec(tmp_path, spec_dict(title="other"), name="other")
    out = tmp_path / "docs" / "REPRODUCTION.md"
    out.parent.mkdir()
    measured = "## toy (`toy`)\n\n| claim | verdict |\n|---|---|\n| B beats A | **reproduced** |\n"
    out.write_text("# header\n\n| experiment | paper | verdict(s) | compute (process-min) |\n|---|---|---|---|\n"
                   "| `toy` | Table X | 1 reproduced | 12 |\n\nTotal ...\n\n" + measured)
    assert measured_sections(out.read_text()) == {"toy": ("| `toy` | Table X | 1 reproduced | 12 |", measured, 12.0)}
    text = docs(tmp_path / "runs", out, tmp_path / "configs").read_text()
    assert "| `toy` | Table X | 1 reproduced | 12 |" in text and measured in text
    assert "| `other` | Table X | not yet run | - |" in text and "Total compute of the measured experiments: 12 " in text
    assert docs(tmp_path / "runs", out, tmp_path / "configs").read_text() == text  # stable when re-run


def _shared_spec() -> dict:
    """An experiment whose `base` arm shares `toy`'s arm `a` training run and fine-tunes `b` from it."""
    return spec_dict(reference="base",
                     arms={"base": {"label": "toy's a", "run_of": "toy/a"},
                           "b": {"overrides": {"init_from": "{run:base}"}}},
                     claims=[{"name": "b above base", "metric": "plain/align/relation", "arm": "b",
                              "against": "base", "direction": "higher"}])


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["arms"]["base"].update(overrides={"steps": 3}), "arms.base.overrides"),
    (lambda d: d["arms"]["base"].update(run_of="toy/zz"), "arms.base.run_of"),
    (lambda d: d["arms"]["base"].update(run_of="nope/a"), "arms.base.run_of"),
    (lambda d: d["arms"]["base"].update(run_of="toy"), "arms.base.run_of"),
])
def test_run_of_spec_errors(tmp_path, mutate, key):
    write_spec(tmp_path, spec_dict())
    d = _shared_spec()
    mutate(d)
    path = write_spec(tmp_path, d, name="share")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_run_of_cycle_between_experiments(tmp_path):
    owner = spec_dict()
    owner["arms"]["a"] = {"run_of": "share/base"}
    write_spec(tmp_path, owner)
    with pytest.raises(SpecError, match=r"circular run_of between experiments \(share -> toy -> share\)"):
        load_spec(write_spec(tmp_path, _shared_spec(), name="share"))


def test_run_of_shares_the_owners_training(tmp_path, monkeypatch):
    """A `run_of` arm trains once, in its owner's directory (`repro run` trains it there first), is evaluated
    under its own experiment, and `{run:ARM}` on it names the owner's run; its training is not counted twice."""
    import functools

    from condiff.repro import __main__ as cli
    from condiff.repro import report, runner

    write_spec(tmp_path, spec_dict())
    exp = load_spec(write_spec(tmp_path, _shared_spec(), name="share"))
    root = tmp_path / "runs"
    assert exp.run_dir(root, "base", 0) == root / "toy" / "a" / "seed0"
    assert exp.arm_dir(root, "base", 0) == root / "share" / "base" / "seed0"
    assert exp.train_overrides(root, "b", 0)["init_from"] == str(root / "toy" / "a" / "seed0")
    assert runner.sources(exp, ["base", "b"]) == {"toy": ["a"]}
    owner_job = runner.plan(load_spec(tmp_path / "configs" / "toy.yaml"), root, 1, {"a": 2, "b": 2})[0]
    jobs = {j.key: j for j in runner.plan(exp, root, 1, {"base": 2, "b": 2})}
    shared = jobs["train base seed0"]
    assert (shared.argv, shared.run_dir, shared.identity) == (owner_job.argv, owner_job.run_dir, owner_job.identity)
    assert jobs["eval base seed0 plain"].out_dir == root / "share" / "base" / "seed0" / "repro_eval" / "plain"

    # `condiff repro run share`: toy's arm a is trained first (trainings only), then share's own jobs
    fake = tmp_path / "fake_condiff.py"
    fake.write_text(FAKE_CONDIFF)
    monkeypatch.setattr(runner, "execute", functools.partial(runner.execute, launcher=[sys.executable, str(fake)],
                                                             poll_s=0.05))
    monkeypatch.setattr(runner, "resolved_configs", lambda exp, root, arms=None: {a: {"steps": 2} for a in arms})
    argv = ["--root", str(root), "--configs", str(tmp_path / "configs"), "run", "share", "--no-progress"]
    assert cli.main(argv) == 0
    calls = (tmp_path / "fake_condiff.py.calls").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["train", "train"] + ["eval"] * 4  # a (for share), b; 2 arms x 2 conds
    assert "(trainings only, for share)" in json.loads((root / "toy" / "run.json").read_text())["command"]
    assert not (root / "toy" / "a" / "seed0" / "repro_eval").exists()  # toy's own evaluations were not run
    assert cli.main(argv) == 0 and len((tmp_path / "fake_condiff.py.calls").read_text().splitlines()) == 6

    rep = json.loads((root / "share" / "report.json").read_text())
    assert rep["arms"]["base"]["run_of"] == "toy/a"
    assert rep["arms"]["base"]["metrics"]["plain/align/relation"]["per_seed"] == {"0": 0.5}  # a's value, seed 0
    own = json.loads((root / "share" / "b" / "seed0" / "repro.json").read_text())["wall_s"]
    assert rep["compute"]["train_s"] == pytest.approx(own, abs=0.05)  # toy's training is counted in toy
    assert "run of `toy/a`" in (root / "share" / "report.md").read_text()
    assert report.build(load_spec(tmp_path / "configs" / "toy.yaml"), root)["arms"]["a"]["metrics"] == {}


def test_grid_of_arms_sampled_at_different_sizes(tmp_path):
    """A 16 px and a 32 px arm in one grid (guidance-law): the smaller samples are upscaled, not refused."""
    from PIL import Image

    from condiff.repro.report import GRID_SAMPLES, write_grids

    exp = load_spec(write_spec(tmp_path, spec_dict()))
    root = tmp_path / "runs"
    for arm, side in (("a", 4), ("b", 8)):
        images = exp.arm_dir(root, arm, 0) / "repro_eval" / "plain" / "images"
        images.mkdir(parents=True)
        for i in range(GRID_SAMPLES):
            Image.new("RGB", (side, side), (200, 0, 0)).save(images / f"{i:06d}.png")
    (grid,) = write_grids(exp, root, tmp_path / "grids")
    assert grid.name == "plain.png"
    one_row = write_grids(load_spec(write_spec(tmp_path, spec_dict(arms={"b": {}}, reference="b", claims=[]))),
                          root, tmp_path / "grids1")[0]
    assert Image.open(grid).size[1] > Image.open(one_row).size[1]  # both arms' rows are drawn


def test_specs_are_found_outside_the_clone(tmp_path, monkeypatch, capsys):
    """From another working directory the CLI reads the specs of the clone condiff was imported from (an
    editable install or PYTHONPATH; CI tests a wheel install, hence the patched SOURCE_CONFIGS); with neither,
    `list` and `run` say where specs come from instead of 'none'."""
    from condiff.repro import __main__ as cli
    from condiff.repro import spec

    if Path(spec.__file__).resolve().is_relative_to(ROOT / "python"):  # imported from this clone (not a wheel)
        assert spec.SOURCE_CONFIGS == ROOT / "configs" / "repro"
    monkeypatch.setattr(spec, "SOURCE_CONFIGS", ROOT / "configs" / "repro")
    monkeypatch.chdir(tmp_path)
    assert spec.default_configs() == ROOT / "configs" / "repro"
    assert cli.main(["--root", str(tmp_path / "r"), "list"]) == 0
    listed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert listed == sorted(p.stem for p in (ROOT / "configs" / "repro").glob("*.yaml")) and "flip" in listed
    monkeypatch.setattr(spec, "SOURCE_CONFIGS", tmp_path / "nowhere")
    assert spec.default_configs() == Path("configs/repro")
    assert cli.main(["list"]) == 1
    assert "ship with the source tree" in capsys.readouterr().err
    assert cli.main(["run", "flip"]) == 2
    err = capsys.readouterr().err
    assert "configs/repro/flip.yaml: no such experiment spec" in err and "pass --configs DIR" in err
