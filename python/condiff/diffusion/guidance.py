"""Classifier-free guidance, the paper's disentangled control guidance (Eq. 2) and the guidance law (Eq. 4).

The guidance law's s for a non-square H x W output is the pixel-count scale sqrt(H W) / sqrt(H0 W0)
(`resolution_scale`, following App. D's derivation).

A guidance wrapper turns a model into a `model_fn(x, t, cond) -> eps` with the samplers' signature.
Guidance is applied to every output channel (facebookresearch/DiT's sampling script guides only the
first 3 latent channels by default; we do not reproduce that).

Null conditions follow `condiff.conditioning.cond` (the same ones the data pipeline drops to in
training): the caller passes the null SEMANTIC condition as a `Cond` (class models:
`labels == num_classes`; text models: the text encoder's encoding of the empty prompt ""), with one
row (broadcast) or one row per sample; the null CONTROL condition is `control_keep = False`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond

SEMANTIC_FIELDS = ("labels", "text", "text_lengths", "pooled")
CONTROL_FIELDS = ("control_h", "control_l")


def guidance_weight_arg(text: str) -> float:
    """argparse `type` for --guidance (lambda) and --control-guidance (beta): a finite float >= 0
    (0 drops the branch's condition, 1 is the plain conditional model; negative weights are not part
    of Eq. 2's use in the paper, and NaN / inf would only write black images)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def guidance_scale_for_resolution(lam: float, scale: float) -> float:
    """Eq. 4 (App. D, Prop. 2): lambda'(s) = 1 + s (lambda - 1), s = new resolution / base resolution
    (`resolution_scale`: the pixel-count scale for non-square outputs).
    E.g. lambda = 1.5 tuned at 256 px -> 2.0 at 512 px (s = 2)."""
    if not scale > 0:
        raise ValueError(f"guidance law: the resolution scale s must be > 0, got {scale!r}")
    return 1.0 + scale * (lam - 1.0)


def resolution_scale(out_hw: tuple[float, float], base_hw: tuple[float, float]) -> float:
    """s of Eq. 4 for an H x W output whose lambda is given at H0 x W0: the pixel-count scale
    s = sqrt(H W) / sqrt(H0 W0) (= H / H0 for square outputs and base, exactly).

    Why the pixel count: App. D derives Eq. 4 from "after upsampling by a scale factor of s, the same low
    resolution patch has s^2 observations", so s^2 is the ratio of pixel counts, whatever the aspect. A
    256 x 512 output of a 256 px model therefore uses s = sqrt(2), not 2 (its longer side) nor 1 (its
    shorter one), and a transposed output the same s.
    """
    h, w = map(float, out_hw)
    h0, w0 = map(float, base_hw)
    if not (h > 0 and w > 0 and h0 > 0 and w0 > 0):
        raise ValueError(f"guidance law: sizes must be > 0, got output {out_hw!r}, base {base_hw!r}")
    if h == w and h0 == w0:
        return h / h0
    return math.sqrt(h * w) / math.sqrt(h0 * w0)


def guidance_base_resolution(schedule_config, model_config: dict, ae_factor: int = 1) -> float:
    """Pixels at which a user's lambda is read before Eq. 4 (s = output / base resolution).

    The model's base resolution: the schedule's Eq. 3 base if the schedule was rescaled (a 256 -> 512 px
    fine-tune: 256), else the positional-grid anchor base_size x patch_size x ae_factor (App. C; a
    fine-tune that kept its base size: 256), else the training resolution input_size x ae_factor.
    So lambda 1.5 given for a 512 px fine-tune of a 256 px model becomes 2.0 at 512 px (the paper's pair).
    schedule_config: `Schedule.config`; model_config: `model.config`.
    """
    if getattr(schedule_config, "base_resolution", None) is not None:
        return float(schedule_config.base_resolution)
    if model_config.get("base_size") and model_config.get("patch_size"):
        return float(model_config["base_size"]) * int(model_config["patch_size"]) * ae_factor
    if model_config.get("input_size"):
        return float(model_config["input_size"]) * ae_factor
    raise ValueError("guidance_base_resolution: the model config has neither base_size/patch_size nor input_size; "
                     "give the resolution lambda is tuned at explicitly")


def control_guidance_weights(lam: float, beta: float) -> dict[str, float]:
    """Coefficients of Eq. 2 on its three predictions:
    eps = lam * [beta * eps(c,s) + (1 - beta) * eps(0,s)] + (1 - lam) * eps(0,0)."""
    return {"cs": lam * beta, "0s": lam * (1.0 - beta), "00": 1.0 - lam}


def with_null_semantic(cond: Cond, null: Cond) -> Cond:
    """`cond` with every semantic field it carries (labels / text / text_lengths / pooled) replaced by
    `null`'s, which has 1 row (broadcast to cond's batch) or exactly as many rows as `cond`."""
    batch = cond.batch_size
    out = {}
    for name in SEMANTIC_FIELDS:
        value = getattr(cond, name)
        if value is None:
            continue
        null_value = getattr(null, name)
        if null_value is None:
            raise ValueError(f"guidance: the condition carries {name!r} but the null condition does not "
                             f"(class models: labels = num_classes; text models: the encoding of \"\")")
        if null_value.shape[0] not in (1, batch):
            raise ValueError(f"guidance: null condition {name!r} has {null_value.shape[0]} rows; expected 1 or {batch}")
        if null_value.shape[1:] != value.shape[1:]:
            raise ValueError(f"guidance: null condition {name!r} has shape {tuple(null_value.shape[1:])} per row, "
                             f"the condition {tuple(value.shape[1:])} (same text encoder / max length needed)")
        out[name] = null_value.to(device=value.device, dtype=value.dtype).expand(batch, *value.shape[1:])
    return replace(cond, **out)


def with_control_keep(cond: Cond, keep: bool) -> Cond:
    """Set control_keep for all rows (AND-ed with the rows' own control_keep when keep=True)."""
    batch = cond.batch_size
    device = next(iter(cond._tensors().values())).device
    mask = torch.full((batch,), keep, dtype=torch.bool, device=device)
    if keep and cond.control_keep is not None:
        mask = cond.control_keep.to(torch.bool)
    return replace(cond, control_keep=mask)


def has_control(cond: Cond) -> bool:
    return any(getattr(cond, name) is not None for name in CONTROL_FIELDS)


class ControlGuidance(nn.Module):
    """Eq. 2 as a model_fn: eps = lam * [beta * eps(c,s) + (1 - beta) * eps(0,s)] + (1 - lam) * eps(0,0).

    lam: semantic guidance scale (lambda; 1 = no guidance). beta: control guidance scale (1 = plain CFG,
    which is Eq. 2 at beta = 1: lam * eps(c,s) + (1 - lam) * eps(0,0); the paper's best FID uses 1.375).
    All predictions with a non-zero coefficient are evaluated in ONE batched forward of
    k in {1, 2, 3} copies of x (rows ordered [(c,s), (0,s), (0,0)]): eps(0,s) is skipped when beta == 1
    and also when `cond` carries no control metadata (then it equals eps(c,s)); eps(0,0) is skipped when
    lam == 1. Memory grows with k: split the batch upstream if needed.
    """

    def __init__(self, model: nn.Module, null_cond: Cond, lam: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.model = model
        self.null_cond = null_cond
        self.lam = float(lam)
        self.beta = float(beta)

    def rows(self, cond: Cond) -> list[tuple[float, Cond]]:
        """[(coefficient, condition)] of the forward passes needed for `cond` (zero coefficients dropped)."""
        w = control_guidance_weights(self.lam, self.beta)
        if not has_control(cond):  # no control metadata: eps(0,s) == eps(c,s)
            w = {"cs": w["cs"] + w["0s"], "0s": 0.0, "00": w["00"]}
        conds = {
            "cs": lambda: with_control_keep(cond, True),
            "0s": lambda: with_control_keep(cond, False),
            "00": lambda: with_control_keep(with_null_semantic(cond, self.null_cond), False),
        }
        return [(coef, conds[key]()) for key, coef in w.items() if coef != 0.0]  # never empty: coefs sum to 1

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        rows = self.rows(cond)
        k = len(rows)
        x_in = x.repeat(k, *([1] * (x.dim() - 1)))  # (k*B, C, H, W)
        t_in = t.repeat(k)  # (k*B,)
        out = self.model(x_in, t_in, Cond.cat([c for _, c in rows]))  # (k*B, C, H, W)
        chunks = out.chunk(k, dim=0)
        eps = rows[0][0] * chunks[0]
        for (coef, _), chunk in zip(rows[1:], chunks[1:], strict=True):
            eps = eps + coef * chunk
        return eps


def classifier_free_guidance(model: nn.Module, null_cond: Cond, lam: float) -> ControlGuidance:
    """Plain CFG (Ho & Salimans): eps = lam * eps(c,s) + (1 - lam) * eps(0,0) = Eq. 2 with beta = 1."""
    return ControlGuidance(model, null_cond, lam=lam, beta=1.0)
