"""Forward + backward time of every backbone at its tiny config on the CPU, relative to DiT-tiny.

One training-shaped step per round: batch 8, 32 x 32 x 4 latents (256 px SD-VAE), class conditioning with
control metadata, loss = mean((eps_pred - eps)^2), backward into every parameter. mDT-v2 runs its full (unmasked) pass;
its two-pass training loss (MDTv2) costs about 1 + (1 - mask_ratio) of that.
The ratio to DiT-tiny (measured in the same session, first) is in `extra_info["rel_to_dit_tiny"]` and in the
summary printed at the end (`-s`). On a shared, loaded machine wall times drift between tests, so
`test_relative_cost_interleaved` (tiny) and `test_relative_cost_interleaved_s` (S/2; the UNet has no S size)
also measure all backbones round-robin in one test, forward alone and forward + backward, in CPU time of the
process (one intra-op thread), and report the minimum over rounds relative to DiT: the numbers to quote.
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
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return
    _MEDIANS[name] = benchmark.stats.stats.median
    if "dit-tiny" in _MEDIANS:
        benchmark.extra_info["rel_to_dit_tiny"] = _MEDIANS[name] / _MEDIANS["dit-tiny"]
    if name == BACKBONES[-1] and "dit-tiny" in _MEDIANS:
        print("\nfwd+bwd median, relative to dit-tiny:")
        for n, m in _MEDIANS.items():
            print(f"  {n:18s} {m * 1e3:8.1f} ms  x{m / _MEDIANS['dit-tiny']:.2f}")


S_BACKBONES = [n.replace("-tiny", "-s/2") for n in BACKBONES if not n.startswith("unet")]  # the UNet has no S size


def _interleaved(names: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Round-robin over the models (one warm-up round), process CPU time with one intra-op thread.
    -> {name: {"fwd": min seconds, "fwd_bwd": min seconds}}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name in names:
            model, step = _step_fn(name)
            x, t, cond = _inputs()
            runs[name] = (model, step, x, t, cond)
        best = {n: {"fwd": float("inf"), "fwd_bwd": float("inf")} for n in names}
        for r in range(rounds + 1):
            for name, (model, step, x, t, cond) in runs.items():
                t0 = time.process_time()
                with torch.no_grad():
                    model(x, t, cond)
                t1 = time.process_time()
                step()
                t2 = time.process_time()
                if r:  # round 0 warms up
                    best[name]["fwd"] = min(best[name]["fwd"], t1 - t0)
                    best[name]["fwd_bwd"] = min(best[name]["fwd_bwd"], t2 - t1)
        return best
    finally:
        torch.set_num_threads(threads)


def _report(benchmark, best: dict, ref: str, title: str) -> None:
    print(f"\n{title} (min CPU time, 1 thread; ratio to {ref}):")
    for n, b in best.items():
        rel_f, rel_fb = b["fwd"] / best[ref]["fwd"], b["fwd_bwd"] / best[ref]["fwd_bwd"]
        benchmark.extra_info.update({f"{n}_fwd_s": b["fwd"], f"{n}_fwd_bwd_s": b["fwd_bwd"],
                                     f"{n}_fwd_rel": rel_f, f"{n}_fwd_bwd_rel": rel_fb})
        print(f"  {n:18s} fwd {b['fwd'] * 1e3:8.1f} ms x{rel_f:.2f}   fwd+bwd {b['fwd_bwd'] * 1e3:8.1f} ms x{rel_fb:.2f}")
        assert 0 < rel_f < 100 and 0 < rel_fb < 100


def test_relative_cost_interleaved(benchmark):
    """Tiny configs, all backbones round-robin (3 timed rounds): forward and forward+backward vs DiT-tiny."""
    best = {}
    benchmark.group = "backbones tiny fwd / fwd+bwd, interleaved (CPU time, 1 thread)"
    benchmark.pedantic(lambda: best.update(_interleaved(BACKBONES, rounds=3)), rounds=1, iterations=1)
    _report(benchmark, best, "dit-tiny", "tiny configs, batch 8, 32x32 latents")


def test_relative_cost_interleaved_s(benchmark):
    """S/2 configs (DiT-S sizes: 12 blocks, width 384), 2 timed rounds: forward and forward+backward vs DiT-S/2."""
    best = {}
    benchmark.group = "backbones S/2 fwd / fwd+bwd, interleaved (CPU time, 1 thread)"
    benchmark.pedantic(lambda: best.update(_interleaved(S_BACKBONES, rounds=2)), rounds=1, iterations=1)
    _report(benchmark, best, "dit-s/2", "S/2 configs, batch 8, 32x32 latents")
