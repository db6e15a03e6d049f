"""Diffusion benchmarks: guidance batching (speed ratio) and sampler accuracy on exact Gaussian data.

guidance: Eq. 2 with lambda = 4, beta = 1.375 needs eps(c,s), eps(0,s), eps(0,0). `ControlGuidance`
    stacks them into ONE forward of 3B rows; the alternative is three forwards of B rows. Both paths
    run interleaved in the same process (ratio = separate / batched, > 1 means batching is faster),
    dit-tiny (4 x 128, patch 2) on 8 latents of 4 x 32 x 32 (256 tokens).
accuracy: data N(0.7, 0.5^2) with the closed-form epsilon, x_T from the exact marginal at the first
    timestep; relative error of the generated variance (20,000 samples) and max error against the exact
    probability-flow ODE map (the samples' standardised noise maps to 0.7 + 0.5 z). No model error:
    what remains is the sampler's discretisation (and, for eta = 1, DDPM's under-dispersion).

Run: PYTHONPATH=python python -m pytest benchmarks/test_bench_diffusion.py --benchmark-only -q -s
"""

import math
import time

import pytest
import torch

from condiff.conditioning.cond import Cond
from condiff.diffusion import ControlGuidance, Schedule, get_sampler, spaced_timesteps

MU, STD = 0.7, 0.5


def test_guidance_batched_vs_separate_forwards(benchmark):
    from condiff.models import create

    torch.manual_seed(0)
    model = create("dit-tiny", num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = 8
    x, t = torch.randn(b, 4, 32, 32), torch.full((b,), 500.0)
    cond = Cond(labels=torch.arange(b), control_h=torch.tensor([[0, 0, 256, 256, 1, 0]]).float().repeat(b, 1),
                control_l=torch.full((b, 2), 256.0))
    null = Cond(labels=torch.tensor([10]))
    guided = ControlGuidance(model, null, lam=4.0, beta=1.375)
    rows = [c for _, c in guided.rows(cond)]

    @torch.no_grad()
    def separate():
        return [model(x, t, c) for c in rows]

    @torch.no_grad()
    def batched():
        return guided(x, t, cond)

    batched(), separate()  # warm-up
    times = {"batched": [], "separate": []}
    for _ in range(10):
        for name, fn in (("batched", batched), ("separate", separate)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratio = min(times["separate"]) / min(times["batched"])
    benchmark.extra_info.update(ratio_separate_over_batched=round(ratio, 3), threads=torch.get_num_threads(),
                                batched_ms=round(1e3 * min(times["batched"]), 2),
                                separate_ms=round(1e3 * min(times["separate"]), 2))
    print(f"\nguidance: batched {1e3 * min(times['batched']):.1f} ms, separate {1e3 * min(times['separate']):.1f} ms, "
          f"ratio {ratio:.2f} ({torch.get_num_threads()} threads)")
    benchmark.pedantic(batched, rounds=3, iterations=1)


def _gaussian_eps(schedule):
    def model_fn(x, t, cond):
        abar = schedule.alpha_bar(int(t[0]))
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        return b * (x - a * MU) / (a**2 * STD**2 + b**2)

    return model_fn


@pytest.mark.parametrize(
    "name, steps, spacing, options",
    [
        ("ddim", 50, "linspace", {}), ("ddim", 250, "linspace", {}), ("ddim", 250, "trailing", {}),
        ("ddim", 1000, "linspace", {"eta": 1.0}),
        ("dpmpp-2m", 20, "trailing", {}), ("dpmpp-2m", 20, "linspace", {}), ("dpmpp-2m", 100, "trailing", {}),
        ("heun", 20, "linspace", {}), ("heun", 50, "linspace", {}),
    ],
)
def test_sampler_accuracy_on_gaussian_data(benchmark, name, steps, spacing, options):
    s = Schedule()
    ts = spaced_timesteps(steps, 1000, spacing)
    g = torch.Generator().manual_seed(0)
    a = math.sqrt(s.alpha_bar(int(ts[0])))
    z = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
    x_T = a * MU + math.sqrt(a * a * STD**2 + 1 - a * a) * z
    sampler = get_sampler(name)
    x0 = benchmark.pedantic(lambda: sampler(_gaussian_eps(s), x_T, ts, None, schedule=s,
                                            generator=torch.Generator().manual_seed(1), **options),
                            rounds=1, iterations=1)
    # deterministic samplers: against the statistics the exact map gives THESE draws (removes the sampling
    # noise of z); stochastic ones (eta > 0): against the data law itself
    stochastic = bool(options.get("eta"))
    var_err = x0.var().item() / (STD**2 * (1.0 if stochastic else z.var().item())) - 1
    mean_err = x0.mean().item() - (MU + (0.0 if stochastic else STD * z.mean().item()))
    ode_err = (x0 - (MU + STD * z)).abs().max().item()
    benchmark.extra_info.update(var_rel_err=round(var_err, 4), mean_err=round(mean_err, 4),
                                ode_max_err=None if stochastic else round(ode_err, 4))
    print(f"\n{name:9s} {steps:5d} {spacing:9s} {options}: variance {100 * var_err:+.2f}%, "
          f"mean {mean_err:+.4f}" + ("" if stochastic else f", ODE max err {ode_err:.4f}"))
