"""Samplers as pure functions with ONE signature (k-diffusion style):

    sampler(model_fn, x_T, timesteps, cond, *, schedule, generator=None, callback=None, **options) -> x_0

model_fn(x, t, cond) -> eps: x (B, C, H, W) in the DDPM-scaled variable x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps (equivalently Eq. 6), t (B,) float DDPM timesteps, cond whatever model_fn takes
(a `Cond` for condiff models; guidance wrappers in `guidance.py` have the same signature).
x_T: the initial noise (B, C, H, W), N(0, I). timesteps: (n,) strictly decreasing integer timesteps in
[0, T) at which the model is evaluated (see `spaced_timesteps`). Every sampler ends at the "final"
level: abar = 1 (sigma = 0, a clean sample) when `set_alpha_to_one=True` (default), else abar_0 (the
least noisy training level, sigma_0 = 0.029: diffusers' `set_alpha_to_one=False`, which leaves that
residual noise in the output). callback, if given, is called after every step with a dict
{"i": step index, "t": timestep, "x": new state, "denoised": x_0 prediction}.
All per-step coefficients are computed in float64 from the schedule and applied in x_T's dtype.
Samplers run under torch.no_grad().
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from condiff.diffusion.schedule import Schedule

SPACINGS = ("leading", "trailing", "linspace")
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def spaced_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                     steps_offset: int = 0) -> Tensor:
    """(num_steps,) int64 decreasing timesteps, exactly as diffusers' DDIMScheduler.set_timesteps builds them
    (Lin et al. 2024, Table 2 names):
      "linspace": round(linspace(0, T-1, n))                 e.g. T=1000, n=10: 999, 888, ..., 111, 0
      "leading":  arange(n) * (T // n) + steps_offset          e.g. 900, 800, ..., 100, 0
      "trailing": round(arange(T, 0, -T/n)) - 1                e.g. 999, 899, ..., 199, 99
    "linspace" visits both ends (999 and 0, like DiT's timestep respacing that the paper's DDIM-250 FIDs
    come from); "leading" never visits T-1; "trailing" ends at T/n - 1, so the final jump to sigma = 0
    returns a posterior mean from a noisy level (variance shrinks: on N(0.7, 0.5^2) data with the exact
    epsilon, DDIM-250 misses the data variance by -2.5% with "linspace", -3.0% with "trailing";
    benchmarks/RESULTS.md). See DEFAULT_SPACING.
    """
    if not (isinstance(num_steps, int) and 1 <= num_steps <= num_train_timesteps):
        raise ValueError(f"num_steps must be an int in [1, {num_train_timesteps}], got {num_steps!r}")
    T, n = num_train_timesteps, num_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T})")
    return torch.from_numpy(ts.copy())


def _timesteps_list(timesteps: Tensor | list[int], schedule: Schedule) -> list[int]:
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if not ts:
        raise ValueError("sampler: timesteps is empty")
    if any(t < 0 or t >= schedule.num_timesteps for t in ts):
        raise ValueError(f"sampler: timesteps must lie in [0, {schedule.num_timesteps}), got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"sampler: timesteps must be strictly decreasing, got {ts}")
    return ts


def _final_alpha_bar(schedule: Schedule, set_alpha_to_one: bool) -> float:
    return 1.0 if set_alpha_to_one else schedule.alpha_bar(0)


def _t_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)  # (B,)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddim(model_fn: ModelFn, x_T: Tensor, timesteps: Tensor | list[int], cond: Any, *, schedule: Schedule,
         generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
         eta: float = 0.0, set_alpha_to_one: bool = True, prev_timestep: str = "next") -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12 and 16). eta = 0: deterministic; eta = 1: DDPM-like ancestral noise.

    Step t -> t_prev:  x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
                       std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
                       x   = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std * z
    prev_timestep: "next" (default) steps to the next entry of `timesteps` (then the final level);
      "diffusers" steps to t - T // n like diffusers' DDIMScheduler.step, which differs from the next
      entry for "linspace" spacing and for "trailing" when n does not divide T (both coincide for
      "leading"); a negative t - T // n goes to the final level. With eta > 0 one N(0, I) draw is made
      per step from `generator` (also at the last step, where std = 0), in diffusers' order.
    """
    ts = _timesteps_list(timesteps, schedule)
    if prev_timestep not in ("next", "diffusers"):
        raise ValueError(f"ddim: prev_timestep must be 'next' or 'diffusers', got {prev_timestep!r}")
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0, got {eta}")
    n, T = len(ts), schedule.num_timesteps
    a_final = _final_alpha_bar(schedule, set_alpha_to_one)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = (ts[i + 1] if i + 1 < n else -1) if prev_timestep == "next" else t - T // n
        a_t = schedule.alpha_bar(t)
        a_prev = schedule.alpha_bar(t_prev) if t_prev >= 0 else a_final
        eps = model_fn(x, _t_batch(t, x), cond).to(x.dtype)
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        std = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - std**2, 0.0)) * eps
        if eta > 0:
            x = x + std * _randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x


@torch.no_grad()
def dpmpp_2m(model_fn: ModelFn, x_T: Tensor, timesteps: Tensor | list[int], cond: Any, *, schedule: Schedule,
             generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
             set_alpha_to_one: bool = True) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; multistep, data prediction, "midpoint" form as diffusers).

    In VP variables alpha = sqrt(abar), s = sqrt(1 - abar), lambda = log(alpha / s) = -log(sigma_EDM):
        h = lambda_next - lambda_t,  x0_t = (x - s_t eps) / alpha_t
        D = x0_t (first step)  or  (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h
        x = (s_next / s_t) x - alpha_next * expm1(-h) * D
    The step to sigma = 0 (set_alpha_to_one) has h = inf and is first order: x = x0_t ("lower order
    final", as k-diffusion and diffusers do). n timesteps cost n model evaluations. Deterministic
    (`generator` is accepted for the common signature and unused).
    """
    ts = _timesteps_list(timesteps, schedule)
    a_final = _final_alpha_bar(schedule, set_alpha_to_one)
    x = x_T
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        a_t = schedule.alpha_bar(t)
        a_next = schedule.alpha_bar(ts[i + 1]) if i + 1 < len(ts) else a_final
        eps = model_fn(x, _t_batch(t, x), cond).to(x.dtype)
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        if a_next >= 1.0:
            x, h = x0, None
        elif a_next == a_t:  # zero-length step (e.g. t = 0 -> abar_0 with set_alpha_to_one=False)
            h = h_prev
        else:
            lam_t = 0.5 * math.log(a_t / (1.0 - a_t))
            lam_next = 0.5 * math.log(a_next / (1.0 - a_next))
            h = lam_next - lam_t
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = math.sqrt((1.0 - a_next) / (1.0 - a_t)) * x - math.sqrt(a_next) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x


@torch.no_grad()
def heun(model_fn: ModelFn, x_T: Tensor, timesteps: Tensor | list[int], cond: Any, *, schedule: Schedule,
         generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
         set_alpha_to_one: bool = True) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE in EDM's variables (Karras et al. 2022, Alg. 1,
    no churn), over the sigma levels of the given integer timesteps (no timestep interpolation needed).

    y = x_t * sqrt(1 + sigma^2) = x_0 + sigma * eps (undoing Eq. 6's scaling); dy/dsigma = eps(y / sqrt(1 +
    sigma^2), t). Euler predictor, trapezoidal corrector evaluated at the next timestep; the last step to
    sigma = 0 is Euler (its Euler step is the DDIM step). n timesteps cost 2n - 1 model evaluations with
    set_alpha_to_one (2n otherwise, the last correction evaluated at t = 0, unless the grid already ends at
    t = 0). Deterministic.
    """
    ts = _timesteps_list(timesteps, schedule)
    sig_final = 0.0 if set_alpha_to_one else schedule.sigma(0)
    sig = schedule.sigma(ts[0])
    y = x_T * math.sqrt(1.0 + sig**2)
    for i, t in enumerate(ts):
        sig = schedule.sigma(t)
        t_next = ts[i + 1] if i + 1 < len(ts) else 0
        sig_next = schedule.sigma(t_next) if i + 1 < len(ts) else sig_final
        eps = model_fn(y / math.sqrt(1.0 + sig**2), _t_batch(t, y), cond).to(y.dtype)
        x0 = y - sig * eps
        y_euler = y + (sig_next - sig) * eps
        if sig_next == 0.0 or sig_next == sig:  # last step to sigma 0 (Euler), or a zero-length step
            y = y_euler
        else:
            eps_next = model_fn(y_euler / math.sqrt(1.0 + sig_next**2), _t_batch(t_next, y), cond).to(y.dtype)
            y = y + (sig_next - sig) * 0.5 * (eps + eps_next)
        if callback is not None:
            callback({"i": i, "t": t, "x": y / math.sqrt(1.0 + sig_next**2), "denoised": x0})
    return y / math.sqrt(1.0 + sig_final**2)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "dpmpp-2m": dpmpp_2m, "heun": heun}
"""Name -> sampler, all with the common signature (what `condiff sample --sampler` accepts)."""

DEFAULT_SPACING: dict[str, str] = {"ddim": "linspace", "heun": "linspace", "dpmpp-2m": "trailing"}
"""Timestep spacing each sampler is most accurate with on uniform-in-t grids (measured on Gaussian data,
tests/test_sampling.py). DPM-Solver++(2M) uses "trailing": with "linspace" its second-to-last step
(e.g. t = 52 -> 0) is a huge jump in log-SNR (lambda ~ -0.5 log(t + 1) near t = 0) and the multistep
extrapolation (ratio r ~ 0.2) overshoots (+29% data variance at 20 steps, vs -16% with "trailing", on
N(0.7, 0.5^2) data with the exact epsilon; diffusers' DPMSolverMultistepScheduler also never puts t = 0
on its grid)."""


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
