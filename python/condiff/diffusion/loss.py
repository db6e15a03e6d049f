"""The training objective: epsilon prediction under Eq. 6 noising, weighted per timestep (App. C).

    t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = (x_0 + sigma_t eps) / sqrt(1 + sigma_t^2)   (Eq. 6)
    loss = mean_b [ w(t_b) * mean_{c,h,w} (model(x_t, t, cond) - eps)^2 ]

with w from `Schedule.weight_table`. Default "edm": App. C's inverse-SNR weight 1/sigma_t^2 multiplies the
EDM denoiser error, and x0_hat - x0 = -sigma_t (eps_hat - eps) (Eq. 17), so the objective is the plain
epsilon MSE (w_t = 1). "eps-inv-snr" (1/sigma_t^2 on the epsilon MSE) and "min-snr-gamma" are options;
see `Schedule.weight_table`.

Masked diffusion transformers (mDT-v2, Gao et al. 2023) train with two passes on the same (x_t, t):
the full pass above plus a pass with a fraction of the image tokens masked out, and sum both losses
(MDT's train.py: loss = loss_full + loss_masked). A model opts in by exposing a float attribute
`mask_ratio` > 0 and accepting `model(x_t, t, cond, mask_ratio=r)`; the masked pass reuses the same t
and noise as the full pass (MDT redraws the noise: same expectation, our choice has lower variance).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from condiff.diffusion.schedule import Schedule


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`) / torch.compile (`._orig_mod`) wrappers, for attribute lookups."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def masked_pass_ratio(model: nn.Module) -> float:
    """The mask ratio of a model that wants the two-pass (full + masked) loss, else 0."""
    return float(getattr(_unwrap(model), "mask_ratio", 0.0) or 0.0)


def _per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"diffusion_loss: model output {tuple(pred.shape)} != noise shape {tuple(target.shape)} "
                         "(the model must predict epsilon with the input's shape)")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)


def diffusion_loss(model: nn.Module, x0: Tensor, cond: Any, schedule: Schedule, *, weighting: str = "edm",
                   snr_gamma: float = 5.0, generator: torch.Generator | None = None, t: Tensor | None = None,
                   noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted epsilon-prediction loss for one batch.

    model(x_t (B,C,H,W), t (B,) float, cond) -> eps (B,C,H,W). x0 (B,C,H,W) clean latents/pixels.
    t (B,) int timesteps and noise (B,C,H,W) may be given (tests, importance sampling); otherwise drawn
    from `generator` (on the generator's device, then moved to x0's device) or the global RNG.
    Returns (loss: scalar float32 with grad, stats) with detached stats:
      "loss", "mse" (unweighted epsilon MSE, batch mean), "mse_per_sample" (B,), "t" (B,) int64, and for
      two-pass models "loss_full", "loss_masked".
    """
    if x0.dim() < 2:
        raise ValueError(f"diffusion_loss: x0 must be batched (B, ...), got shape {tuple(x0.shape)}")
    batch, device = x0.shape[0], x0.device
    draw_device = generator.device if generator is not None else device
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=draw_device)
    t = torch.as_tensor(t).to(device=device, dtype=torch.long)
    if t.shape != (batch,):
        raise ValueError(f"diffusion_loss: t must have shape ({batch},), got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
    noise = noise.to(device)
    x_t = schedule.add_noise(x0, noise, t)  # (B, C, H, W), Eq. 6
    w = schedule.loss_weight(t, weighting, snr_gamma)  # (B,)

    mse = _per_sample_mse(model(x_t, t.float(), cond), noise)  # (B,)
    loss = (w * mse).mean()
    stats = {"mse": mse.detach().mean(), "mse_per_sample": mse.detach(), "t": t}
    ratio = masked_pass_ratio(model)
    if ratio > 0:
        mse_masked = _per_sample_mse(model(x_t, t.float(), cond, mask_ratio=ratio), noise)  # (B,)
        loss_masked = (w * mse_masked).mean()
        stats.update(loss_full=loss.detach(), loss_masked=loss_masked.detach())
        loss = loss + loss_masked
    stats["loss"] = loss.detach()
    return loss, stats
