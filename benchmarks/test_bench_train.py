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
