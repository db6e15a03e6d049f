"""Train-step throughput (img/s) of every backbone on the CPU: tiny and S configs.

One step = the trainer's work per optimizer step: `diffusion_loss` forward (Eq. 6 noising, 1/sigma^2
weighting), backward, gradient clipping, Adam (betas 0.9/0.95), EMA update. Class-conditional models.
  tiny: 16 px pixel space (the CPU recipes in configs/tiny/), batch 64, 3 timed rounds;
  S:    256 px SD-VAE latents (32 x 32 x 4), `<family>-s/2` (DiT-S: depth 12, width 384), batch 8, ONE timed
        step (seconds per step on a CPU). The UNet has no S size: `unet-sdxl-tiny` only.
GPU figures (DiT-XL/2, mmDiT-XL/2 at 256 in bf16 with MFU) need a device: not measured here.
Run: `PYTHONPATH=python python -m pytest benchmarks/test_bench_train.py --benchmark-only -q`
"""

import pytest
import torch

from condiff.diffusion import Schedule
from condiff.diffusion.loss import diffusion_loss
from condiff.models import create
from condiff.train.ema import EMA

FAMILIES = ["dit", "dit-att", "mdt-v2", "pixart-alpha", "mmdit", "mmdit-ours"]
CASES = [(f"{f}-tiny", 16, 3, 64, 3) for f in FAMILIES] + [("unet-sdxl-tiny", 16, 3, 64, 3)]
CASES += [(f"{f}-s/2", 32, 4, 8, 1) for f in FAMILIES]


def _model(name: str, size: int, channels: int) -> torch.nn.Module:
    if name.startswith("unet"):
        return create(name, conditioning="class", num_classes=8, in_channels=channels, out_channels=channels)
    return create(name, conditioning="class", num_classes=8, in_channels=channels, input_size=size)


@pytest.mark.parametrize("name,size,channels,batch,rounds", CASES, ids=[c[0] for c in CASES])
def test_train_step_throughput(benchmark, name, size, channels, batch, rounds):
    torch.manual_seed(0)
    model = _model(name, size, channels).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    ema = EMA(model, decay=0.9999)
    schedule = Schedule()
    x0 = torch.randn(batch, channels, size, size)
    from condiff.conditioning.cond import Cond

    cond = Cond(labels=torch.randint(0, 8, (batch,)))
    state = {"step": 0}

    def step():
        loss, _ = diffusion_loss(model, x0, cond, schedule)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, state["step"])
        state["step"] += 1
        return loss

    step()  # warm-up (allocations, lazy init)
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    sec = benchmark.stats.stats.min
    benchmark.extra_info.update(img_per_s=batch / sec, batch=batch, params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                                threads=torch.get_num_threads(), input=f"{channels}x{size}x{size}")
    assert torch.isfinite(step())


def test_demo_step_vs_notes_reference(benchmark):
    """The `condiff demo` train step (mmdit-ours-tiny, text, 16 px patch 2, batch 32, 12 text tokens of
    width 384 as the cached MiniLM states) timed against the notes' reference step (a DiT with depth 4,
    width 128, 4 heads, patch 4 at 32 px, batch 64: 0.23-0.24 s quiet on 2 threads,
    shared/notes/cpu-training-budget.md), interleaved in one run: the ratio transfers to a quiet machine."""
    import time

    from condiff.conditioning.cond import Cond

    schedule = Schedule()
    demo = create("mmdit-ours-tiny", conditioning="text", in_channels=3, input_size=16, patch_size=2,
                  text_dim=384, pooled_dim=384, text_len=12).train()
    ref = create("dit-tiny", conditioning="class", num_classes=12, in_channels=3, input_size=32, patch_size=4).train()
    opt_d = torch.optim.Adam(demo.parameters(), lr=1e-3, betas=(0.9, 0.95))
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.9, 0.95))
    cond_d = Cond(text=torch.randn(32, 12, 384), text_lengths=torch.full((32,), 12), pooled=torch.randn(32, 384),
                  control_h=torch.tensor([[0.0, 0.0, 48.0, 48.0, 1.0, 0.0]]).repeat(32, 1),
                  control_l=torch.full((32, 2), 48.0), control_keep=torch.ones(32, dtype=torch.bool))
    cond_r = Cond(labels=torch.randint(0, 12, (64,)))
    x_d, x_r = torch.randn(32, 3, 16, 16), torch.randn(64, 3, 32, 32)

    def one(model, opt, x, cond):
        t0 = time.perf_counter()
        loss, _ = diffusion_loss(model, x, cond, schedule, weighting="min-snr-gamma")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {"demo": [], "ref": []}

    def pair():
        times["demo"].append(one(demo, opt_d, x_d, cond_d))
        times["ref"].append(one(ref, opt_r, x_r, cond_r))

    pair()  # warm-up
    times = {"demo": [], "ref": []}
    benchmark.pedantic(pair, rounds=8, iterations=1)
    ratio = sorted(times["demo"])[len(times["demo"]) // 2] / sorted(times["ref"])[len(times["ref"]) // 2]
    benchmark.extra_info.update(demo_s_median=sorted(times["demo"])[4], ref_s_median=sorted(times["ref"])[4],
                                ratio=ratio, quiet_demo_s_estimate=0.235 * ratio,
                                steps_in_10_min_estimate=int(600 / (0.235 * ratio)))
    assert ratio > 0
