"""Experiment specs of `condiff repro`: one YAML file per experiment under configs/repro/NAME.yaml.

An experiment is a set of ARMS (ordinary `condiff train` runs that differ by config overrides), each
trained for several SEEDS, evaluated under named CONDITIONS (`condiff eval` flags: guidance, size
conditioning, flip, resolution, ...), and the paper's CLAIMS tested on the results. Keys:

    title: Flip conditioning                     # one line
    paper: {source: Table 2c, statement: ..., numbers: {...}}   # what the paper reports (free-form numbers)
    recipe: ../tiny/mmdit_ours.yaml              # base training recipe, relative to this file
    data: {preset: demo, n: 4096, seed: 0, set: {n_objects: [1, 2]}}   # optional shapes set, written once
                                                 # under runs/repro/_data/ and given to every arm as data.shards
    overrides: {steps: 1000, batch_size: 32}     # dotted or nested train-config keys, for every arm
    seeds: 3                                     # seeds 0..N-1 (`--seeds N` overrides)
    budget: why these steps                      # stated in the report (a budget the baseline learns at)
    reference: no_flip                           # the arm every difference is taken against
    arms:
      no_flip: {label: no flip augmentation, overrides: {data.flip: false}}
      pre16: {eval: false, overrides: {...}}     # trained but not reported (e.g. a shared pre-training stage)
      ft32: {overrides: {init_from: "{run:pre16}"}}   # "{run:ARM}": ARM's run dir at the same seed (a dependency)
      base: {run_of: loss-weighting/edm}         # this arm's training IS that experiment's arm's run (same seed):
                                                 # trained once, there (`repro run` trains it first when absent),
                                                 # evaluated here; no overrides of its own
    eval:                                        # `condiff eval` flags shared by every condition
      metrics: [align]
      n: 64
      prompts: shapes:demo
      steps: 25
      guidance: 3.0
      conditions:                                # name -> extra `condiff eval` flags (may be {})
        flip0: {}
        flip1: {flip: 1}
    claims:                                      # each tested by a 95% CI of a difference over seeds
      - name: conditioning restores left/right
        metric: flip0/align/relation              # CONDITION/METRIC as `condiff eval` names it
        arm: flip_cond
        against: flip_nocond                      # another arm (same metric), or
        # against_metric: flip1/align/relation    # the same arm under another condition
        direction: higher                         # higher | lower: what the paper says `arm` does
        paper: "..."                              # the paper's number(s) for this comparison

Every problem raises `SpecError` naming the file and the dotted key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_CONFIGS = Path("configs/repro")
# the source tree this package was imported from (a clone: python/condiff/repro/spec.py -> the clone's root)
SOURCE_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "repro"
RUN_REF = re.compile(r"\{run:([A-Za-z0-9_\-]+)\}")
DIRECTIONS = ("higher", "lower")
# `condiff eval` flags a spec may set (value -> `--flag value`; True -> `--flag`; False / None -> omitted)
EVAL_FLAGS = ("metrics", "n", "prompts", "steps", "sampler", "guidance", "guidance_resolution", "no_guidance_law",
              "control_guidance", "size_cond", "flip", "resolution", "rescale_schedule", "seed", "batch_size",
              "features", "ref_train", "ref_val", "ref_max", "shapes_preset", "shapes_ref_n", "lpips_sizes",
              "lpips_prompts", "lpips_include_low", "lpips_random", "raw_weights")
TOP_KEYS = ("title", "paper", "recipe", "data", "overrides", "seeds", "budget", "reference", "arms", "eval", "claims")


class SpecError(ValueError):
    """An invalid experiment spec; the message names the file and the dotted key."""


@dataclass
class Arm:
    name: str
    label: str
    overrides: dict[str, Any]  # flat dotted keys -> values (after the experiment-wide overrides)
    evaluate: bool = True
    deps: tuple[str, ...] = ()  # arms whose run dir this arm's overrides name ("{run:ARM}")
    run_of: tuple[str, str] | None = None  # (EXPERIMENT, ARM) whose training run this arm shares


@dataclass
class Claim:
    name: str
    metric: str  # CONDITION/METRIC
    arm: str
    against: str  # an arm
    against_metric: str  # CONDITION/METRIC of `against` (= metric unless a within-arm comparison)
    direction: str  # "higher" | "lower": the paper's direction for arm vs against
    paper: str = ""


@dataclass
class Experiment:
    name: str
    path: Path
    title: str
    paper: dict[str, Any]
    recipe: Path
    data: dict[str, Any] | None
    overrides: dict[str, Any]
    seeds: int
    budget: str
    reference: str
    arms: dict[str, Arm]
    eval_flags: dict[str, Any]
    conditions: dict[str, dict[str, Any]]
    claims: list[Claim] = field(default_factory=list)
    _sources: dict[str, tuple[Experiment, str] | None] = field(default_factory=dict, repr=False, compare=False)

    def reported_arms(self) -> list[str]:
        return [a for a, arm in self.arms.items() if arm.evaluate]

    def arm_dir(self, root: Path, arm: str, seed: int) -> Path:
        """Where this experiment keeps ARM's seed: its training run, or only its evaluations (`run_of` arms)."""
        return root / self.name / arm / f"seed{seed}"

    def source(self, arm: str) -> tuple[Experiment, str] | None:
        """(experiment, arm) whose training run `arm` shares (`run_of`), followed to the run's owner."""
        if arm not in self._sources:  # each spec read once per Experiment, not once per call
            run_of = self.arms[arm].run_of
            src = None if run_of is None else load_spec(run_of[0], self.path.parent)
            self._sources[arm] = None if src is None else src.source(run_of[1]) or (src, run_of[1])
        return self._sources[arm]

    def run_dir(self, root: Path, arm: str, seed: int) -> Path:
        """ARM's training run at `seed` (the owner's directory for a `run_of` arm)."""
        src = self.source(arm)
        return src[0].run_dir(root, src[1], seed) if src else self.arm_dir(root, arm, seed)

    def train_overrides(self, root: Path, arm: str, seed: int) -> dict[str, Any]:
        """The flat `key=value` overrides of one training run (run_dir and seed included, "{run:ARM}" resolved)."""
        src = self.source(arm)
        if src:
            return src[0].train_overrides(root, src[1], seed)
        out: dict[str, Any] = {}
        if self.data is not None:
            out["data.shards"] = str(data_dir(root, self.data))
        out.update(self.overrides)
        out.update(self.arms[arm].overrides)
        out = {k: _resolve_refs(v, lambda a: str(self.run_dir(root, a, seed))) for k, v in out.items()}
        out["run_dir"] = str(self.run_dir(root, arm, seed))
        out["seed"] = seed
        return out

    def eval_argv(self, condition: str) -> list[str]:
        """`condiff eval` flags of one condition (shared flags, then the condition's)."""
        flags = {**self.eval_flags, **self.conditions[condition]}
        argv: list[str] = []
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False and value is not None:
                argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        return argv


def data_dir(root: Path, data: dict[str, Any]) -> Path:
    """Where the shapes set `data` (preset, n, seed, set) is written: runs/repro/_data/<preset>-<n>-<hash>."""
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    return root / "_data" / f"{data['preset']}-{data['n']}-{key}"


def _resolve_refs(value: Any, run_of) -> Any:
    if isinstance(value, str):
        return RUN_REF.sub(lambda m: run_of(m.group(1)), value)
    return value


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}; dict values under `model.kwargs` etc. are
    flattened too (overrides are applied key by key)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _expect(ok: bool, path: Path, key: str, expected: str, got: Any = None) -> None:
    if not ok:
        raise SpecError(f"{path}: {key}: expected {expected}" + ("" if got is None else f", got {got!r}"))


def _mapping(value: Any, path: Path, key: str) -> dict:
    _expect(isinstance(value, dict), path, key, "a mapping", value)
    return value


def spec_path(name_or_path: str, configs: Path = REPO_CONFIGS) -> Path:
    """CONFIGS/NAME.yaml for a name; a path ending in .yaml as given."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return configs / f"{name_or_path}.yaml"


def default_configs() -> Path:
    """Where the experiment specs are: ./configs/repro when the working directory is a clone, else the clone
    this package was imported from (an editable install or PYTHONPATH=python). The specs and the recipes they
    name live in the source tree, not in the wheel: from a wheel outside a clone, pass --configs."""
    for candidate in (REPO_CONFIGS, SOURCE_CONFIGS):
        if candidate.is_dir():
            return candidate
    return REPO_CONFIGS


def missing_configs_hint(configs: Path) -> str:
    """One sentence on where specs come from, for errors about an empty or absent spec directory."""
    return (f"no experiment specs under {configs} (the specs ship with the source tree, in a clone's configs/repro: "
            f"run from the clone's root, or pass --configs DIR)")


def list_specs(configs: Path = REPO_CONFIGS) -> list[Path]:
    return sorted(configs.glob("*.yaml"))


_LOADING: list[Path] = []  # specs being loaded (a `run_of` cycle across experiments is an error)


def load_spec(name_or_path: str | Path, configs: Path = REPO_CONFIGS) -> Experiment:
    """Parse and check one spec; SpecError names the file and the key."""
    path = spec_path(str(name_or_path), configs)
    if path.resolve() in _LOADING:
        chain = " -> ".join(p.stem for p in _LOADING + [path.resolve()])
        raise SpecError(f"{path}: arms: circular run_of between experiments ({chain})")
    _LOADING.append(path.resolve())
    try:
        return _load_spec(path, configs)
    finally:
        _LOADING.pop()


def _load_spec(path: Path, configs: Path) -> Experiment:
    if not path.is_file():
        known = ", ".join(p.stem for p in list_specs(configs))
        raise SpecError(f"{path}: no such experiment spec "
                        + (f"(known under {configs}: {known})" if known else f"({missing_configs_hint(configs)})"))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: invalid YAML ({e})") from e
    _mapping(raw, path, "<top level>")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    _expect(not unknown, path, unknown[0] if unknown else "", f"one of the keys {', '.join(TOP_KEYS)}", None)

    for key in ("title", "recipe", "reference"):
        _expect(isinstance(raw.get(key), str) and raw[key], path, key, "a non-empty string", raw.get(key))
    recipe = (path.parent / raw["recipe"]).resolve()
    _expect(recipe.is_file(), path, "recipe", "a training recipe file (relative to the spec)", str(recipe))
    paper = _mapping(raw.get("paper", {}), path, "paper")
    seeds = raw.get("seeds", 1)
    _expect(isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1, path, "seeds",
            "a positive integer", seeds)
    overrides = _flatten(_mapping(raw.get("overrides", {}), path, "overrides"))
    data = raw.get("data")
    if data is not None:
        data = dict(_mapping(data, path, "data"))
        bad = sorted(set(data) - {"preset", "n", "seed", "set"})
        _expect(not bad, path, f"data.{bad[0]}" if bad else "data", "keys preset, n, seed, set")
        _expect(isinstance(data.get("preset"), str), path, "data.preset", "a shapes preset name", data.get("preset"))
        _expect(isinstance(data.get("n"), int) and data["n"] > 0, path, "data.n", "a positive integer", data.get("n"))
        data.setdefault("seed", 0)
        data["set"] = dict(_mapping(data.get("set", {}), path, "data.set"))

    arms_raw = _mapping(raw.get("arms"), path, "arms")
    _expect(len(arms_raw) >= 1, path, "arms", "at least one arm")
    arms: dict[str, Arm] = {}
    for name, body in arms_raw.items():
        key = f"arms.{name}"
        _expect(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_\-]+", name) is not None, path, key,
                "an arm name of letters, digits, '_' or '-'", name)
        body = _mapping(body if body is not None else {}, path, key)
        bad = sorted(set(body) - {"label", "overrides", "eval", "run_of"})
        _expect(not bad, path, f"{key}.{bad[0]}" if bad else key, "keys label, overrides, eval, run_of")
        run_of = _run_of(body.get("run_of"), path, key) if "run_of" in body else None
        _expect(run_of is None or not body.get("overrides"), path, f"{key}.overrides",
                "no overrides on a run_of arm (its training is the other experiment's run)")
        arm_over = _flatten(_mapping(body.get("overrides", {}), path, f"{key}.overrides"))
        for k in ("run_dir", "seed"):
            _expect(k not in arm_over and k not in overrides, path, f"{key}.overrides.{k}",
                    "no run_dir / seed override (the runner sets them)")
        deps = tuple(dict.fromkeys(m for v in arm_over.values() if isinstance(v, str) for m in RUN_REF.findall(v)))
        evaluate = body.get("eval", True)
        _expect(isinstance(evaluate, bool), path, f"{key}.eval", "true or false", evaluate)
        arms[name] = Arm(name, str(body.get("label", name)), arm_over, evaluate, deps, run_of)
    for arm in arms.values():
        for dep in arm.deps:
            _expect(dep in arms and dep != arm.name, path, f"arms.{arm.name}.overrides",
                    f"{{run:ARM}} naming another arm of this spec ({', '.join(arms)})", f"{{run:{dep}}}")
    _check_acyclic(arms, path)
    _expect(raw["reference"] in arms and arms[raw["reference"]].evaluate, path, "reference",
            f"an evaluated arm ({', '.join(a for a in arms if arms[a].evaluate)})", raw["reference"])

    ev = dict(_mapping(raw.get("eval"), path, "eval"))
    conditions = _mapping(ev.pop("conditions", {"default": {}}), path, "eval.conditions")
    _expect(len(conditions) >= 1, path, "eval.conditions", "at least one condition")
    for k in ev:
        _expect(k in EVAL_FLAGS, path, f"eval.{k}", f"a `condiff eval` flag ({', '.join(EVAL_FLAGS)})")
    conds: dict[str, dict] = {}
    for cname, body in conditions.items():
        _expect(isinstance(cname, str) and "/" not in cname, path, f"eval.conditions.{cname}",
                "a condition name without '/'", cname)
        body = _mapping(body if body is not None else {}, path, f"eval.conditions.{cname}")
        for k in body:
            _expect(k in EVAL_FLAGS, path, f"eval.conditions.{cname}.{k}",
                    f"a `condiff eval` flag ({', '.join(EVAL_FLAGS)})")
        conds[cname] = dict(body)
    _expect("metrics" in ev or all("metrics" in c for c in conds.values()), path, "eval.metrics",
            "the metrics to compute (e.g. [align])")

    claims = []
    for i, c in enumerate(raw.get("claims") or []):
        key = f"claims[{i}]"
        c = _mapping(c, path, key)
        bad = sorted(set(c) - {"name", "metric", "arm", "against", "against_metric", "direction", "paper"})
        _expect(not bad, path, f"{key}.{bad[0]}" if bad else key,
                "keys name, metric, arm, against, against_metric, direction, paper")
        for k in ("name", "metric", "arm", "direction"):
            _expect(isinstance(c.get(k), str) and c[k], path, f"{key}.{k}", "a non-empty string", c.get(k))
        _expect(c["direction"] in DIRECTIONS, path, f"{key}.direction", "higher or lower", c["direction"])
        against = c.get("against", c["arm"])
        for k, a in (("arm", c["arm"]), ("against", against)):
            _expect(a in arms and arms[a].evaluate, path, f"{key}.{k}", "an evaluated arm", a)
        for k in ("metric", "against_metric"):
            m = c.get(k, c["metric"])
            _expect(isinstance(m, str) and m.split("/")[0] in conds and "/" in m, path, f"{key}.{k}",
                    f"CONDITION/METRIC with a condition of eval.conditions ({', '.join(conds)})", m)
        _expect(against != c["arm"] or c.get("against_metric", c["metric"]) != c["metric"], path, key,
                "a comparison of two arms, or of two metrics of one arm (against_metric)")
        claims.append(Claim(c["name"], c["metric"], c["arm"], against, c.get("against_metric", c["metric"]),
                            c["direction"], str(c.get("paper", ""))))
    return Experiment(name=path.stem, path=path, title=raw["title"], paper=paper, recipe=recipe, data=data,
                      overrides=overrides, seeds=seeds, budget=str(raw.get("budget", "")), reference=raw["reference"],
                      arms=arms, eval_flags=ev, conditions=conds, claims=claims)


def _run_of(value: Any, path: Path, key: str) -> tuple[str, str]:
    """`run_of: EXPERIMENT/ARM` checked against the spec of EXPERIMENT beside `path`."""
    _expect(isinstance(value, str) and value.count("/") == 1, path, f"{key}.run_of", "EXPERIMENT/ARM", value)
    name, arm = value.split("/")
    src_path = path.parent / f"{name}.yaml"
    _expect(src_path.is_file() and src_path.resolve() != path.resolve(), path, f"{key}.run_of",
            f"another experiment of {path.parent} (EXPERIMENT/ARM)", value)
    src = load_spec(src_path)
    _expect(arm in src.arms, path, f"{key}.run_of", f"an arm of {src_path} ({', '.join(src.arms)})", value)
    return name, arm


def _check_acyclic(arms: dict[str, Arm], path: Path) -> None:
    state: dict[str, int] = {}

    def visit(a: str, chain: list[str]) -> None:
        if state.get(a) == 1:
            raise SpecError(f"{path}: arms: circular {{run:ARM}} dependency {' -> '.join(chain + [a])}")
        if state.get(a) == 2:
            return
        state[a] = 1
        for d in arms[a].deps:
            visit(d, chain + [a])
        state[a] = 2

    for a in arms:
        visit(a, [])


def topological(arms: dict[str, Arm]) -> list[str]:
    """Arm names, every arm after the arms it depends on (spec order otherwise)."""
    out: list[str] = []

    def add(a: str) -> None:
        if a not in out:
            for d in arms[a].deps:
                add(d)
            out.append(a)

    for a in arms:
        add(a)
    return out
