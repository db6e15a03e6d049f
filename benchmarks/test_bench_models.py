"""Forward + backward time of every backbone at its tiny config on the CPU, relative to DiT-tiny.

One training-shaped step per round: batch 8, 32 x 32 x 4 latents (256 px SD-VAE), class conditioning with
control metadata, loss = mean((eps_pred - eps)^2), backward into every parameter. mDT-v2 runs its full (unmasked) pass;
its two-pass training loss (MDTv2) costs about 1 + (1 - mask_ratio) of that.
The ratio to DiT-tiny (measured in the same session, first) is in `extra_info["rel_to_dit_tiny"]` and in the
summary printed at the end (`-s`). On a shared, loaded machine wall times drift between tests, so
`test_relative_cost_interleaved` also measures all backbones round-robin in one test, in CPU time of the
process (one intra-op thread), and reports the minimum over rounds relative to DiT-tiny: the number to quote.
Run:
    PYTHONPATH=python python -m pytest benchmarks/test_bench_models.py --benchmark-only -q -s
"""

import time

import pytest
import torch

from condiff.conditioning.cond import Cond
from condiff.models import create

BACKBONES = ["dit-tiny", "dit-att-tiny", "mdt-v2-tiny", "pixart-alpha-tiny", "mmdit-tiny", "mmdit-ours-tiny",
             "unet-sdxl-tiny"]  # dit-tiny first: the reference of the ratios
BATCH, LATENT = 8, 32
_MEDIANS: dict[str, float] = {}


def _step_fn(name: str):
    """A fresh tiny model (seed 0) and its training-shaped step closure."""
    torch.manual_seed(0)
    model = create(name, "class").train()
    x, t, cond = _inputs()
    target = torch.randn_like(x)

    def step():
        model.zero_grad(set_to_none=True)
        (model(x, t, cond) - target).square().mean().backward()

    return model, step


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    t = torch.rand(BATCH, generator=g) * 999
    cond = Cond(labels=torch.randint(0, 1000, (BATCH,), generator=g),
                control_h=torch.tensor([[0.0, 0.0, 256.0, 256.0, 1.0, 0.0]]).repeat(BATCH, 1),
                control_l=torch.tensor([[256.0, 256.0]]).repeat(BATCH, 1))
    return x, t, cond


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_backward_tiny(benchmark, name):
    model, step = _step_fn(name)
    benchmark.group = "backbones tiny fwd+bwd (CPU, batch 8, 32x32 latents)"
    benchmark.extra_info["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())  # a real backward
    _MEDIANS[name] = benchmark.stats.stats.median
    if "dit-tiny" in _MEDIANS:
        benchmark.extra_info["rel_to_dit_tiny"] = _MEDIANS[name] / _MEDIANS["dit-tiny"]
    if name == BACKBONES[-1] and "dit-tiny" in _MEDIANS:
        print("\nfwd+bwd median, relative to dit-tiny:")
        for n, m in _MEDIANS.items():
            print(f"  {n:18s} {m * 1e3:8.1f} ms  x{m / _MEDIANS['dit-tiny']:.2f}")


def test_relative_cost_interleaved(benchmark):
    """All backbones round-robin (3 rounds after a warm-up), process CPU time with one thread; min per model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps = {name: _step_fn(name)[1] for name in BACKBONES}
    best = {name: float("inf") for name in BACKBONES}

    def run():
        for _ in range(4):
            for name, step in steps.items():
                t0 = time.process_time()
                step()
                best[name] = min(best[name], time.process_time() - t0)

    try:
        benchmark.group = "backbones tiny fwd+bwd, interleaved (CPU time, 1 thread)"
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    ratios = {name: best[name] / best["dit-tiny"] for name in BACKBONES}
    benchmark.extra_info.update({f"{n}_s": best[n] for n in BACKBONES})
    benchmark.extra_info.update({f"{n}_rel": ratios[n] for n in BACKBONES})
    print("\ninterleaved fwd+bwd, min CPU time (1 thread), relative to dit-tiny:")
    for n in BACKBONES:
        print(f"  {n:18s} {best[n] * 1e3:8.1f} ms  x{ratios[n]:.2f}")
    assert all(0 < r < 100 for r in ratios.values())
