"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): track power-function EMA profiles during training, snapshot them, and after training
reconstruct the EMA of ANY length by least squares over the snapshots.

Power-function EMA (EDM2 Sec. 3.1). Measured in optimizer steps, the EMA at step t averages the
weights theta_tau of the steps tau in (0, t] with the profile

    p_t(tau) = (gamma + 1) / t^(gamma + 1) * tau^gamma,

which is what the update  ema_t = beta_t * ema_(t-1) + (1 - beta_t) * theta_t  with

    beta_t = (1 - 1/t)^(gamma + 1)                                                   (t = 1, 2, ...)

produces: the weight of theta_tau in ema_t is prod_(s>tau) beta_s * (1 - beta_tau)
= (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), i.e. exactly the integral of p_t over
(tau - 1, tau] (`discrete_weights`). The length is stated as the relative standard deviation of the
profile (EDM2 Sec. 3.1, App. C.1):

    sigma_rel = sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3)),

so one sigma_rel means the same fraction of training whenever the EMA is read; gamma comes from
sigma_rel as the largest real root of the cubic  gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0,
s = sigma_rel^-2 (the relation above, squared and rearranged).

Reconstruction (EDM2 Sec. 3.2, App. C.2). Snapshot i (profile gamma_i read at step t_i) holds
sum_tau p_i(tau) theta_tau. The requested profile p_r (gamma_r, read at t_r) is approximated by
sum_i x_i p_i, with x minimising the L2 distance || sum_i x_i p_i - p_r ||^2 in tau. The normal equations
A x = b use the closed-form inner products of two power profiles (`profile_inner`):

    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) * max(t_a, t_b)) * (t_min / t_max)^gamma_late,

gamma_late the exponent of the profile read LATER (the integral runs over the shorter support only).
The reconstruction is then sum_i x_i * snapshot_i, computed in float64.

On disk (under the run directory, never touched by `keep_last` pruning):
    run_dir/phema/step_00005000-sigma_0.0500.safetensors   one full model state dict per (step, profile),
        metadata {"step", "sigma_rel", "gamma", "kind": "condiff-phema"} (strings, as safetensors requires).
The live profiles are also part of every checkpoint (`phema.safetensors`, keys "<sigma_rel>/<name>").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


SNAPSHOT_DIR = "phema"
SNAPSHOT_KIND = "condiff-phema"
CHECKPOINT_FILE = "phema.safetensors"


# ------------------------------------------------------------------------------------------ the math
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power profile with relative standard deviation `sigma_rel` (App. C.1).

    Valid for 0 < sigma_rel < sqrt(1/12) ~ 0.2887 (gamma -> 0, a uniform average over all of training)."""
    limit = gamma_to_sigma_rel(0.0)
    if not 0.0 < sigma_rel < limit:
        raise ValueError(f"sigma_rel must be in (0, {limit:.4f}) (the uniform average's sigma_rel), got {sigma_rel}")
    s = sigma_rel ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile p(tau) ~ tau^gamma on (0, 1] (App. C.1)."""
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


def power_beta(gamma: float, t: int) -> float:
    """EMA decay at step t >= 1 (1-based): beta_t = (1 - 1/t)^(gamma + 1); beta_1 = 0."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def discrete_weights(gamma: float, t: int) -> np.ndarray:
    """Weights (t,) of theta_1 .. theta_t in the power EMA read at step t (closed form, sums to 1)."""
    tau = np.arange(t + 1, dtype=np.float64) / t
    cdf = tau ** (gamma + 1.0)  # integral of p_t over (0, tau]
    return np.diff(cdf)


def profile_inner(gamma_a, t_a, gamma_b, t_b) -> np.ndarray:
    """L2 inner product <p_a, p_b> of two power profiles (broadcasting numpy arrays; App. C.2)."""
    gamma_a, t_a, gamma_b, t_b = (np.asarray(v, dtype=np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    t_max, t_min = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    gamma_late = np.where(t_a >= t_b, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * (t_min / t_max) ** gamma_late


def solve_coefficients(steps, gammas, step: int, gamma: float) -> np.ndarray:
    """Coefficients x (N,) such that sum_i x_i p_(gammas[i], steps[i]) best approximates p_(gamma, step) in
    L2 (normal equations of EDM2's least squares, App. C.2; lstsq tolerates near-collinear snapshots)."""
    steps, gammas = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_inner(gammas[:, None], steps[:, None], gammas[None, :], steps[None, :])  # (N, N)
    rhs = profile_inner(gammas, steps, gamma, step)  # (N,)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def relative_residual(steps, gammas, step: int, gamma: float, x: np.ndarray) -> float:
    """|| sum_i x_i p_i - p_r || / || p_r ||: how well the snapshots span the requested profile."""
    steps, gammas = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_inner(gammas[:, None], steps[:, None], gammas[None, :], steps[None, :])
    rhs = profile_inner(gammas, steps, gamma, step)
    target = float(profile_inner(gamma, step, gamma, step))
    err2 = float(x @ gram @ x - 2 * x @ rhs + target)
    return math.sqrt(max(err2, 0.0) / target)


# ------------------------------------------------------------------------------------------ training
def sigma_key(sigma_rel: float) -> str:
    """Canonical text of a sigma_rel in file names and checkpoint keys (4 decimals: 0.05 -> '0.0500')."""
    return f"{sigma_rel:.4f}"


def load_checkpoint_state(ckpt_dir: str | os.PathLike, kind: str = "power") -> dict[str, Tensor]:
    """The profiles stored in a checkpoint (`phema.safetensors`), for `PowerEMA.load_state_dict`."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing, so ema.kind={kind} cannot resume this run (it was trained with "
                         f"ema.kind=exp); use a new run_dir or ema.kind=exp")
    return load_file(str(path))


def snapshot_path(run_dir: str | os.PathLike, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:08d}-sigma_{sigma_key(sigma_rel)}.safetensors"


def write_snapshot(run_dir: str | os.PathLike, step: int, sigma_rel: float, gamma: float,
                   state: dict[str, Tensor]) -> Path:
    """Atomically write one snapshot (temporary file + fsync + os.replace)."""
    path = snapshot_path(run_dir, step, sigma_rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"kind": SNAPSHOT_KIND, "step": str(int(step)), "sigma_rel": repr(float(sigma_rel)),
            "gamma": repr(float(gamma)), "format": "pt"}
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def read_snapshot_meta(path: Path) -> Snapshot:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != SNAPSHOT_KIND:
        raise ValueError(f"{path}: not a post-hoc EMA snapshot (metadata kind={meta.get('kind')!r}, "
                         f"expected {SNAPSHOT_KIND!r})")
    try:
        return Snapshot(path, int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: snapshot metadata needs integer 'step' and float 'sigma_rel'/'gamma' "
                         f"(got {meta})") from e


def list_snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """Every snapshot of a run, sorted by (step, sigma_rel)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [read_snapshot_meta(p) for p in folder.glob("step_*.safetensors")]
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def load_snapshot(snap: Snapshot) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(snap.path))


@dataclass
class Reconstruction:
    state: dict[str, Tensor]  # full model state dict (dtypes of the snapshots)
    sigma_rel: float
    step: int
    snapshots: list[Snapshot]
    coefficients: list[float]
    residual: float  # relative L2 error of the profile fit (0 = exact)


def reconstruct(run_dir: str | os.PathLike, sigma_rel: float, step: int | None = None) -> Reconstruction:
    """The power EMA with `sigma_rel` read at `step` (default: the newest snapshot's step), from the
    run's snapshots at steps <= `step`. Snapshot tensors are combined in float64."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise FileNotFoundError(f"{Path(run_dir) / SNAPSHOT_DIR}: no post-hoc EMA snapshots (train with "
                                f"ema.kind=power or both, and ema.snapshot_every > 0)")
    last = max(s.step for s in snaps)
    step = last if step is None else int(step)
    if step < 1:
        raise ValueError(f"--step must be >= 1, got {step}")
    snaps = [s for s in snaps if s.step <= step]
    if not snaps:
        raise ValueError(f"--step {step}: no snapshot at or before it (first at step {min(s.step for s in list_snapshots(run_dir))})")
    if step != snaps[-1].step:
        raise ValueError(f"--step {step}: no snapshot at this step (the EMA between snapshots is unknown); "
                         f"snapshot steps: {sorted({s.step for s in snaps})[-8:]} (newest {last})")
    x = solve_coefficients([s.step for s in snaps], [s.gamma for s in snaps], step, gamma)
    residual = relative_residual([s.step for s in snaps], [s.gamma for s in snaps], step, gamma, x)
    acc: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, snap in zip(x, snaps):
        for name, value in load_snapshot(snap).items():
            if name not in acc:
                acc[name] = torch.zeros(value.shape, dtype=torch.float64)
                dtypes[name] = value.dtype
            elif acc[name].shape != value.shape:
                raise ValueError(f"{snap.path}: tensor {name!r} has shape {tuple(value.shape)}, other snapshots "
                                 f"{tuple(acc[name].shape)} (snapshots from different models?)")
            if value.is_floating_point():
                acc[name].add_(value.double(), alpha=float(coef))
            else:  # integer buffers (e.g. counters) are not averaged: keep the newest snapshot's value
                acc[name] = value.double()
    state = {k: v.to(dtypes[k]) for k, v in acc.items()}
    return Reconstruction(state, float(sigma_rel), step, snaps, [float(c) for c in x], residual)


def write_checkpoint(rec: Reconstruction, run_dir: str | os.PathLike, out: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Save `rec` as a normal checkpoint under `out` (out/step_XXXXXXXX/ + out/latest) that
    `condiff sample` / `condiff eval` load: the run's meta.json (newest checkpoint at or before the step,
    else the newest) with `step` and a `phema` record; the weights go to model.safetensors. An existing
    out/step_XXXXXXXX is replaced only with `overwrite`."""
    from condiff.io import checkpoint as ckpt

    source = None
    for c in ckpt.list_checkpoints(run_dir):
        if source is None or ckpt.read_meta(c).step <= rec.step:
            source = c
    if source is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to take meta.json (model config, schedule) from")
    meta = ckpt.read_meta(source)
    meta.extra["phema"] = {"sigma_rel": rec.sigma_rel, "gamma": sigma_rel_to_gamma(rec.sigma_rel), "step": rec.step,
                     "residual": rec.residual, "meta_from": str(source),
                     "snapshots": [{"file": s.path.name, "coefficient": c} for s, c in zip(rec.snapshots, rec.coefficients)]}
    return ckpt.save_checkpoint(out, rec.step, model_state=rec.state, ema_state=None, meta=meta, overwrite=overwrite)


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="condiff ema", description="Reconstruct the EMA of any length from a run's "
                                "post-hoc EMA snapshots (EDM2 least squares) and save it as a checkpoint.")
    p.add_argument("--run", required=True, help="run directory (with phema/ snapshots and a checkpoint)")
    p.add_argument("--sigma-rel", type=float, required=True, help="EMA length as relative std, e.g. 0.08")
    p.add_argument("--step", type=int, default=None, help="read the EMA at this step (default: newest snapshot)")
    p.add_argument("--out", default=None, help="output checkpoint directory (default RUN/ema_<sigma_rel>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or Path(args.run) / f"ema_{sigma_key(args.sigma_rel)}")
    try:
        rec = reconstruct(args.run, args.sigma_rel, args.step)
        path = write_checkpoint(rec, args.run, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"condiff ema: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(path), "sigma_rel": rec.sigma_rel, "step": rec.step,
                      "snapshots": len(rec.snapshots), "residual": rec.residual}))
    return 0
