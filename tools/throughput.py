"""Train-step throughput and model FLOPs utilisation (MFU) of a zoo backbone (a measurement tool, used by
tools/gpu_check.py; not part of the library).

MFU = achieved model FLOP/s / the device's peak dense bf16 FLOP/s, with the model FLOPs of one train step
taken as 3 x forward (backward = 2 x forward), the forward counted analytically by `condiff.flops` at
batch 1 (FLOPs = 2 x MACs, attention matmuls included, Table A1's convention) and multiplied by the batch.
Recomputation (activation checkpointing) is NOT counted as model FLOPs, as in the PaLM definition of MFU.

One step is what the trainer does per optimizer step: Eq. 6 noising + loss (`diffusion_loss`, 1/sigma^2
weighting) under autocast, backward, gradient clipping, Adam. Inputs are SD-VAE-shaped latents
(4 x r/8 x r/8), class-conditional.
"""

from __future__ import annotations

import time

import torch

from condiff.conditioning.cond import Cond
from condiff.diffusion import Schedule
from condiff.diffusion.loss import diffusion_loss
from condiff.flops import LATENT_CHANNELS, VAE_FACTOR, measure

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of a known CUDA device, else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_step_throughput(name: str, resolution: int = 256, batch: int = 32, *, device: str | torch.device = "cuda",
                          precision: str = "bf16", steps: int = 10, warmup: int = 3, **overrides) -> dict:
    """Time `steps` train steps of `create(name, conditioning="class", **overrides)` on `device` ->
    {model, resolution, batch, step_ms, img_per_s, model_tflops_per_step, achieved_tflops, peak_tflops, mfu}."""
    from condiff.models import create

    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    device = torch.device(device)
    _, fwd = measure(name, "class", resolutions=(resolution,), build=lambda n, c: create(n, conditioning=c, **overrides))
    step_flops = 3 * fwd[resolution] * batch
    model = create(name, conditioning="class", **overrides).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    schedule = Schedule()
    side = resolution // VAE_FACTOR
    x0 = torch.randn(batch, LATENT_CHANNELS, side, side, device=device)
    cond = Cond(labels=torch.randint(0, model.config.get("num_classes", 1000), (batch,), device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss, _ = diffusion_loss(model, x0, cond, schedule)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    peak = peak_tflops(device)
    achieved = step_flops / sec / 1e12
    return {"model": name, "resolution": resolution, "batch": batch, "precision": precision, "step_ms": 1e3 * sec,
            "img_per_s": batch / sec, "model_tflops_per_step": step_flops / 1e12, "achieved_tflops": achieved,
            "peak_tflops": peak, "mfu": None if peak is None else achieved / peak}
