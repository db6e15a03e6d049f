"""Reports of `condiff repro`: runs/repro/NAME/report.md + report.json + PNG plots and sample grids, and
docs/REPRODUCTION.md collecting every experiment.

Numbers: each finished evaluation's metrics (`repro_eval/COND/repro.json`, copied from the `condiff eval`
manifest) under the key COND/METRIC, per arm and seed. Per arm: mean and 95% t-interval over seeds; against
the reference arm and in every claim: the difference with its 95% interval, paired by seed when both sides
have the same seeds (`condiff.repro.stats`). Verdict per claim: reproduced / not reproduced / inconclusive.
Grids: the first GRID_SAMPLES samples of seed 0 of every arm, one row per arm: the same initial noise and
the same prompts in every row (`condiff eval` draws sample i from (seed, i) only).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from condiff.io.atomic import atomic_write_text
from condiff.repro import stats
from condiff.repro.runner import MARKER, read_json
from condiff.repro.spec import Experiment, list_specs, load_spec

GRID_SAMPLES = 8
CI_NOTE = ("95% Student-t intervals over seeds (mean +- t_{0.975,n-1} s/sqrt(n)); differences paired by seed "
           "(every arm trains and samples with the same seeds), Welch t when the seed sets differ; "
           "a claim is inconclusive when the interval of its difference contains 0")


def _shown(metric: str) -> bool:
    """Metric keys reported (counts such as align/n are not results)."""
    last = metric.rsplit("/", 1)[-1]
    return not (last == "n" or last.startswith("n_"))


def collect(exp: Experiment, root: Path) -> tuple[dict, dict]:
    """({arm: {COND/METRIC: {seed: value}}}, {"train_s", "eval_s"}) from the finished evaluations."""
    values: dict[str, dict[str, dict[int, float]]] = {a: {} for a in exp.reported_arms()}
    compute = {"train_s": 0.0, "eval_s": 0.0}
    seed_dirs: set[int] = set()
    for arm in exp.arms:
        for run in sorted((root / exp.name / arm).glob("seed*")):
            seed = int(run.name[4:])
            seed_dirs.add(seed)
            rec = read_json(run / MARKER)
            if rec:
                compute["train_s"] += rec.get("wall_s", 0.0)
            if arm not in values:
                continue
            for cond in exp.conditions:
                ev = read_json(run / "repro_eval" / cond / MARKER)
                if ev is None:
                    continue
                compute["eval_s"] += ev.get("wall_s", 0.0)
                for k, v in ev["metrics"].items():
                    if isinstance(v, (int, float)) and _shown(k):
                        values[arm].setdefault(f"{cond}/{k}", {})[seed] = float(v)
    return values, compute


def build(exp: Experiment, root: Path) -> dict[str, Any]:
    """The report.json content (see the module docstring)."""
    values, compute = collect(exp, root)
    run_rec = read_json(root / exp.name / "run.json") or {}
    arms = {}
    for arm in exp.reported_arms():
        run_of = exp.arms[arm].run_of
        arms[arm] = {"label": exp.arms[arm].label, "overrides": exp.arms[arm].overrides,
                     "run_of": "/".join(run_of) if run_of else None,
                     "metrics": {k: {"per_seed": {str(s): v for s, v in sorted(per.items())},
                                     **stats.t_interval(list(per.values())).to_dict()}
                                 for k, per in sorted(values[arm].items())}}
    ref = exp.reference
    diffs = {arm: {k: stats.difference(per, values[ref][k]).to_dict() for k, per in sorted(values[arm].items())
                   if k in values[ref]}
             for arm in exp.reported_arms() if arm != ref}
    claims = []
    for c in exp.claims:
        a, b = values[c.arm].get(c.metric, {}), values[c.against].get(c.against_metric, {})
        row: dict[str, Any] = {"name": c.name, "metric": c.metric, "arm": c.arm, "against": c.against,
                               "against_metric": c.against_metric, "direction": c.direction, "paper": c.paper}
        if a and b:
            d = stats.difference(a, b)
            row.update(arm_value=stats.t_interval(list(a.values())).to_dict(),
                       against_value=stats.t_interval(list(b.values())).to_dict(),
                       difference=d.to_dict(), verdict=stats.verdict(d, c.direction))
        else:
            row.update(verdict="not run", difference=None)  # an arm (or condition) without finished evaluations
        claims.append(row)
    seeds = sorted({int(s) for arm in arms.values() for m in arm["metrics"].values() for s in m["per_seed"]})
    return {"name": exp.name, "title": exp.title, "paper": exp.paper, "spec": str(exp.path), "budget": exp.budget,
            "reference": ref, "seeds": seeds, "conditions": exp.conditions, "eval": exp.eval_flags,
            "overrides": exp.overrides, "data": exp.data, "arms": arms, "differences": diffs, "claims": claims,
            "statistics": CI_NOTE, "compute": {k: round(v, 1) for k, v in compute.items()},
            "run": run_rec, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write(exp: Experiment, root: Path) -> Path:
    """Write runs/repro/NAME/report.json, report.md, plots/*.png and grids/*.png; returns report.md's path."""
    out = root / exp.name
    out.mkdir(parents=True, exist_ok=True)
    rep = build(exp, root)
    rep["files"] = {"grids": [str(p.relative_to(out)) for p in write_grids(exp, root, out / "grids")],
                    "plots": [str(p.relative_to(out)) for p in write_plots(rep, out / "plots")]}
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1))
    atomic_write_text(out / "report.md", markdown(rep, image_dir=""))
    return out / "report.md"


def write_grids(exp: Experiment, root: Path, out: Path) -> list[Path]:
    """One grid per condition: a row per evaluated arm, seed 0's first GRID_SAMPLES samples (same noise and
    prompts in every row). Arms sampled at different sizes (e.g. 16 and 32 px models) are shown at the
    largest, upscaled by nearest neighbour."""
    import numpy as np
    import torch
    from PIL import Image

    from condiff.inference.grid import save_grid

    written = []
    for cond in exp.conditions:
        images, labels = [], []
        for arm in exp.reported_arms():
            files = sorted((exp.arm_dir(root, arm, 0) / "repro_eval" / cond / "images").glob("*.png"))[:GRID_SAMPLES]
            if len(files) < GRID_SAMPLES:
                continue
            images += [Image.open(f).convert("RGB") for f in files]
            labels.append(exp.arms[arm].label)
        if images:
            size = (max(im.width for im in images), max(im.height for im in images))
            rows = [torch.from_numpy(np.array(im.resize(size, Image.NEAREST))).permute(2, 0, 1) for im in images]
            out.mkdir(parents=True, exist_ok=True)
            written.append(save_grid(torch.stack(rows), out / f"{cond}.png", nrow=GRID_SAMPLES, min_cell=48,
                                     row_captions=labels))
    return written


def write_plots(rep: dict, out: Path) -> list[Path]:
    """One PNG per claim: both sides' mean with its 95% interval, each seed's values joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for i, c in enumerate(rep["claims"]):
        if c.get("difference") is None:
            continue
        sides = [(c["against"], c["against_metric"]), (c["arm"], c["metric"])]
        per = [rep["arms"][a]["metrics"][m]["per_seed"] for a, m in sides]
        fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=110)
        for j, ((a, m), key) in enumerate(zip(sides, ("against_value", "arm_value"))):
            iv = c[key]
            err = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
            ax.bar(j, iv["mean"], yerr=err, capsize=6, color=("#9aa" if j == 0 else "#48c"), alpha=0.8)
        for s in per[0]:
            if s in per[1]:
                ax.plot([0, 1], [per[0][s], per[1][s]], "k.-", lw=0.8, alpha=0.6)
        ax.set_xticks([0, 1], [_side_label(rep, a, m, c) for a, m in sides], fontsize=7)
        ax.set_ylabel(c["metric"].split("/", 1)[1], fontsize=8)
        ax.set_title(f"{c['name']}\n{c['verdict']}", fontsize=8)
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"claim{i + 1}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _side_label(rep: dict, arm: str, metric: str, claim: dict) -> str:
    label = rep["arms"][arm]["label"]
    return f"{label}\n({metric.split('/')[0]})" if claim["arm"] == claim["against"] else label


def _cell(iv: dict | None, digits: int = 3) -> str:
    if iv is None:
        return "-"
    if iv["lo"] is None:
        return f"{iv['mean']:.{digits}f} (n={iv['n']})"
    return f"{iv['mean']:.{digits}f} [{iv['lo']:.{digits}f}, {iv['hi']:.{digits}f}]"


def claims_table(rep: dict) -> str:
    lines = ["| claim | metric | paper | arm | against | arm - against [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for c in rep["claims"]:
        against = c["against"] if c["against_metric"] == c["metric"] else f"{c['against']} @ {c['against_metric']}"
        lines.append(f"| {c['name']} ({c['direction']} is the paper's direction) | {c['metric']} | {c['paper'] or '-'} "
                     f"| {_cell(c.get('arm_value'))} ({c['arm']}) | {_cell(c.get('against_value'))} ({against}) "
                     f"| {_cell(c.get('difference'))} {'(' + c['difference']['method'] + ')' if c.get('difference') else ''} "
                     f"| **{c['verdict']}** |")
    return "\n".join(lines)


def arms_table(rep: dict, cond: str) -> str:
    keys = sorted({k for arm in rep["arms"].values() for k in arm["metrics"] if k.split("/", 1)[0] == cond})
    if not keys:
        return ""
    head = "| arm | " + " | ".join(k.split("/", 1)[1] for k in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for name, arm in rep["arms"].items():
        ref = " (reference)" if name == rep["reference"] else ""
        ref += f" (training: run of `{arm['run_of']}`)" if arm.get("run_of") else ""
        lines.append(f"| {arm['label']}{ref} | " + " | ".join(_cell(arm["metrics"].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def diffs_table(rep: dict, cond: str) -> str:
    keys = sorted({k for d in rep["differences"].values() for k in d if k.split("/", 1)[0] == cond})
    if not keys:
        return ""
    lines = ["| arm - reference | " + " | ".join(k.split("/", 1)[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, d in rep["differences"].items():
        lines.append(f"| {rep['arms'][name]['label']} | " + " | ".join(_cell(d.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _steps_line(rep: dict) -> str:
    steps = rep["overrides"].get("steps")
    return f"{steps} training steps per run" if steps else "training steps per arm as in the spec"


def markdown(rep: dict, image_dir: str = "", heading: str = "#") -> str:
    """report.md (image_dir: prefix of the plot/grid paths, "" beside report.json)."""
    paper = rep["paper"]
    run = rep.get("run") or {}
    parts = [f"{heading} {rep['title']} (`{rep['name']}`)", "",
             f"**Paper** ({paper.get('source', '?')}): {paper.get('statement', '')}"]
    if paper.get("numbers"):
        parts.append(f"Paper numbers: {json.dumps(paper['numbers'])}")
    parts += ["", f"**Setup**: spec `{rep['spec']}`; {_steps_line(rep)}; seeds {rep['seeds'] or 'none finished'}; "
              f"reference arm `{rep['reference']}`; evaluation `condiff eval` flags {json.dumps(rep['eval'])}, "
              f"conditions {json.dumps(rep['conditions'])}."]
    if rep["budget"]:
        parts += ["", f"**Budget**: {rep['budget']}"]
    missing = [a["label"] for a in rep["arms"].values() if not a["metrics"]]
    if missing:
        parts += ["", f"**Not run**: {', '.join(missing)} (no finished evaluation: no numbers; claims on them "
                  "say \"not run\")."]
    parts += ["", f"**Statistics**: {rep['statistics']}.", "", f"{heading}# Claims", "", claims_table(rep)]
    for cond in rep["conditions"]:
        table = arms_table(rep, cond)
        if table:
            parts += ["", f"{heading}# Condition `{cond}`: per arm (mean [95% CI])", "", table]
            dt = diffs_table(rep, cond)
            if dt:
                parts += ["", dt]
    files = rep.get("files", {})
    for g in files.get("grids", []):
        cond = Path(g).stem.removeprefix(f"{rep['name']}_")  # docs/repro/ prefixes the experiment name
        parts += ["", f"Samples, seed 0, same noise and prompts per column (rows: arms), condition "
                  f"`{cond}`:", "", f"![{cond}]({image_dir}{g})"]
    for p in files.get("plots", []):
        parts += ["", f"![{Path(p).stem}]({image_dir}{p})"]
    total = rep["compute"]["train_s"] + rep["compute"]["eval_s"]
    parts += ["", f"**Compute**: {total / 60:.1f} process-minutes ({rep['compute']['train_s'] / 60:.1f} training, "
              f"{rep['compute']['eval_s'] / 60:.1f} evaluation)"
              + (f"; last `{run.get('command', '')}` took {run.get('wall_s', 0) / 60:.1f} min wall"
                 + (f" ({run['total_wall_s'] / 60:.1f} over every invocation)"
                    if run.get("total_wall_s", 0) > run.get("wall_s", 0) + 30 else "") + " on "
                 f"{run.get('machine', {}).get('cpu', '?')} ({run.get('machine', {}).get('cores', '?')} cores, "
                 f"{run.get('jobs', '?')} jobs x {run.get('threads', '?')} threads)" if run else "") + "."
              + (" Training of the arms marked \"run of\" is counted in the experiment that owns it."
                 if any(a.get("run_of") for a in rep["arms"].values()) else ""),
              "", f"Report written {rep['written']}."]
    return "\n".join(parts) + "\n"


DOC_HEADER = """# Reproducing the paper's findings at toy scale (`condiff repro`)

Each experiment below is a spec in `configs/repro/` run by `condiff repro run NAME --jobs 2`: ordinary
`condiff train` runs of tiny models on the procedural shapes data (pixel space, 16 px unless stated) for a
few seeds each, evaluated by `condiff eval` with the same sampling seeds for every arm, and a verdict per
claim of the paper. This file is generated by `condiff repro report --docs` from the runs' report.json
files; each experiment's full report (per-seed numbers, all metrics) is runs/repro/NAME/report.md. An arm
marked "run of EXPERIMENT/ARM" evaluates that experiment's training run (same recipe, steps and seeds),
so a model is trained once for every experiment that reads it; its training compute is counted once, in
the experiment that owns it.

{statistics}.

Toy scale is not the paper's scale: a verdict here says whether the mechanism shows the paper's
direction on a task a 2-core CPU trains in minutes, nothing about ImageNet or CC12M. Negative and
inconclusive results are reported as such; no setting was tuned to make a claim pass. Where a budget was
chosen, it was chosen so that the reference arm learns the task at all, and the spec says so.
"""


def _size(exp: Experiment) -> str:
    """"A arms x K seeds, N training steps" of a spec (steps as its overrides state them)."""
    steps = [exp.arms[a].overrides.get("steps", exp.overrides.get("steps")) for a in exp.arms]
    total = f", {sum(steps) * exp.seeds} training steps" if all(isinstance(s, int) for s in steps) else ""
    return f"{len(exp.arms)} arms x {exp.seeds} seeds{total}, {len(exp.conditions)} evaluation condition(s) per run"


def measured_sections(text: str) -> dict[str, tuple[str, str, float]]:
    """The measured experiments of an existing REPRODUCTION.md: name -> (summary row, section, process-minutes).
    Lets `docs` keep what was measured in another tree (run directories are not in git)."""
    rows = {m.group(1): (m.group(0), float(m.group(2)))
            for m in re.finditer(r"^\| `([\w.-]+)` \|.*\| ([0-9.]+) \|$", text, flags=re.M)}
    found = {}
    for section in re.split(r"\n(?=## )", text):
        m = re.match(r"## .*\(`([\w.-]+)`\)\n", section)
        if m and m.group(1) in rows:
            found[m.group(1)] = (rows[m.group(1)][0], section.rstrip("\n") + "\n", rows[m.group(1)][1])
    return found


def docs(root: Path, out: Path, configs: Path) -> Path:
    """docs/REPRODUCTION.md: every spec of `configs`, measured (from its report.json), else as measured in the
    existing `out` (kept, so a tree without the run directories does not erase results), else marked not yet run."""
    img_dir = out.parent / "repro"
    previous = measured_sections(out.read_text()) if out.is_file() else {}
    sections, summary, total = [], [], 0.0
    for path in list_specs(configs):
        exp = load_spec(path, configs)
        rep_path = root / exp.name / "report.json"
        rep = read_json(rep_path)
        command = f"condiff repro run {exp.name} --jobs 2"
        if (rep is None or not rep["seeds"]) and exp.name in previous:
            row, section, minutes = previous[exp.name]
            summary.append(row)
            sections.append(section)
            total += minutes
            continue
        if rep is None or not rep["seeds"]:
            summary.append(f"| `{exp.name}` | {exp.paper.get('source', '')} | not yet run | - |")
            sections.append(f"## {exp.title} (`{exp.name}`)\n\n**Paper** "
                            f"({exp.paper.get('source', '?')}): {exp.paper.get('statement', '')}\n\n"
                            f"**Not yet run.** The spec exists (`{path}`: {_size(exp)}); command: `{command}`. "
                            "No numbers are reported for it.\n")
            continue
        # copy the grids and plots next to this file, so the document shows them
        files = {}
        for kind in ("grids", "plots"):
            files[kind] = []
            for rel in rep.get("files", {}).get(kind, []):
                dest = img_dir / f"{exp.name}_{Path(rel).name}"
                img_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / exp.name / rel, dest)
                files[kind].append(dest.name)
        rep = {**rep, "files": files}
        minutes = (rep["compute"]["train_s"] + rep["compute"]["eval_s"]) / 60
        total += minutes
        counts = {v: sum(c["verdict"] == v for c in rep["claims"]) for v in (*stats.VERDICTS, "not run")}
        verdicts = ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no claim"
        summary.append(f"| `{exp.name}` | {exp.paper.get('source', '')} | {verdicts} | {minutes:.0f} |")
        body = markdown(rep, image_dir="repro/", heading="##")
        sections.append(body + f"\nCommand: `{rep.get('run', {}).get('command') or command}`.\n")
    text = DOC_HEADER.format(statistics=CI_NOTE[0].upper() + CI_NOTE[1:])
    text += ("\n| experiment | paper | verdict(s) | compute (process-min) |\n|---|---|---|---|\n" + "\n".join(summary)
             + f"\n\nTotal compute of the measured experiments: {total:.0f} process-minutes "
             f"({total / 60:.1f} process-hours).\n\n" + "\n".join(sections))
    atomic_write_text(out, text)
    return out
