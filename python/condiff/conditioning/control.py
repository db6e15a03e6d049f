"""Control-metadata conditioning (paper Sec. 2.1, Eq. 1, Table 2a, Table A6).

Control metadata are the parameters of the data augmentation (crop box, aspect ratio, flip: the
high-level phi_h, `Cond.control_h` (B, 6)) and of the data itself (original image size: the low-level
phi_l, `Cond.control_l` (B, 2)); field layouts in `condiff.conditioning.cond`.

Two ways to turn them into an embedding that is added to the timestep embedding (the adaLN input):
  * "additive" (SDXL baseline): one embedder over all 8 scalars, c_emb = E(phi_h, phi_l), i.e. gamma = 1.
  * "disentangled" (ours, Eq. 1): c_emb = E_h(phi_h) + gamma_c(t) * E_l(phi_l), gamma_c a schedule in t
    that is 0 at high noise (t -> T) and 1 at low noise (t -> 0), so the low-level size condition only
    enters once the image semantics are fixed.
Each embedder E is sinusoidal features of every scalar (`freq_dim` channels each, as SDXL's
`add_time_proj`) followed by Linear -> SiLU -> Linear with the output layer zero-initialised, so a fresh
model's control embedding is exactly zero and training starts from the unconditional-on-control model.

Null control (`Cond.control_keep == False`, used by condition dropout and by the control guidance of
Eq. 2) gives c_emb = 0 for that row. A `Cond` that carries no control at all is treated as null control
for every row (e.g. a sampler that does not care about control).

Scaling of the inputs: crop box and sizes are pixels (SDXL feeds raw pixels to its sinusoidal features);
aspect ratio (w / h, ~0.25..4) and flip (0 / 1) are multiplied by `UNITLESS_SCALE` = 1000 first so they
use the same frequency band as pixel values instead of the lowest-frequency channels only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import CONTROL_GROUPS, CONTROL_H_FIELDS, CONTROL_L_FIELDS, Cond

GAMMA_KINDS = ("none", "uniform", "linear", "step", "power-cosine")
CONTROL_MODES = ("none", "additive", "disentangled")
UNITLESS_SCALE = 1000.0
_H_SCALE = (1.0, 1.0, 1.0, 1.0, UNITLESS_SCALE, UNITLESS_SCALE)  # per CONTROL_H_FIELDS
_L_SCALE = (1.0, 1.0)  # per CONTROL_L_FIELDS


def gamma_c(t_frac: Tensor, kind: str = "power-cosine", alpha: float = 8.0, k: float = 1.0,
            sigma: Tensor | None = None) -> Tensor:
    """Weight of the low-level control embedding E_l in Eq. 1, as a function of the noise level.

    t_frac (B,) = t / T in [0, 1], 1 = pure noise. Returns (B,) float in [0, 1]:
      none          0                                   (no low-level control: Table 2a "zero")
      uniform       1                                   (SDXL: constant weighting, Table 2a "unif.")
      linear        1 - t_frac                          (Table A6 "linear")
      step          1[sigma_t <= k]                     (Table A6 delta(sigma_t <= k); needs `sigma` (B,),
                                                          the EDM noise level sigma_t = sqrt((1-abar)/abar))
      power-cosine  cos(pi/2 * t_frac) ** alpha         (Eq. 1 / Fig. 3 / Table 2a, alpha in {1,2,4,8})
    The power-cosine formula is our precise reading of "cosine schedule with exponent alpha that is zeroed
    out early": it is 1 at t = 0, 0 at t = T, monotonically decreasing in t, and larger alpha pushes the
    low-level condition later into the denoising process (alpha = 8: gamma < 0.5 for t_frac > 0.26).
    """
    t_frac = t_frac.float()
    if kind == "none":
        return torch.zeros_like(t_frac)
    if kind == "uniform":
        return torch.ones_like(t_frac)
    if kind == "linear":
        return (1.0 - t_frac).clamp(0.0, 1.0)
    if kind == "power-cosine":
        if alpha <= 0:
            raise ValueError(f"gamma_c: power-cosine needs alpha > 0, got {alpha}")
        return torch.cos(0.5 * math.pi * t_frac.clamp(0.0, 1.0)).clamp_min(0.0) ** alpha
    if kind == "step":
        if sigma is None:
            raise ValueError("gamma_c: kind 'step' needs sigma (B,), the EDM noise level of each row")
        return (sigma.float() <= k).float()
    raise ValueError(f"gamma_c: kind must be one of {GAMMA_KINDS}, got {kind!r}")


def pinned_sigmas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """EDM noise levels (T,) float64 of the paper's pinned schedule (quadratic betas, App. C).

    Used by the 'step' gamma to map a model's timestep t to sigma_t; the training schedule of
    `condiff.diffusion` uses the same betas (a resolution-rescaled schedule, Eq. 3, shifts sigma_t, and the
    step threshold k keeps its meaning on the base schedule's t).
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, 0)
    return ((1.0 - abar) / abar).sqrt()


def check_control_fields(fields, where: str = "control_fields") -> tuple[str, ...]:
    """Validate a list of control-field group names (`cond.CONTROL_GROUPS`); returns it as a tuple."""
    fields = tuple(fields)
    bad = [f for f in fields if f not in CONTROL_GROUPS]
    if bad or len(set(fields)) != len(fields):
        raise ValueError(f"{where}: expected distinct names from {list(CONTROL_GROUPS)}, got {list(fields)}")
    return fields


def field_mask(names: tuple[str, ...], fields) -> tuple[float, ...]:
    """1.0 for every scalar of `names` (CONTROL_H_FIELDS / CONTROL_L_FIELDS) in a conditioned group, else 0.0."""
    on = {n for g in fields for n in CONTROL_GROUPS[g]}
    return tuple(1.0 if n in on else 0.0 for n in names)


def sinusoidal_features(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sin-cos features of every scalar: values (B, n) -> (B, n * dim), [cos, sin] per scalar (SDXL/DiT order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[..., None] * freqs  # (B, n, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten(1)  # (B, n * dim)


class ControlMLP(nn.Module):
    """One control embedder E: sinusoidal features of n scalars -> Linear -> SiLU -> Linear (zero-init out).

    Input (B, n) raw metadata; output (B, dim). `scale` (n,) multiplies the inputs first (see module doc).
    Parameter names follow diffusers' `TimestepEmbedding` (linear_1, linear_2).
    """

    def __init__(self, num_fields: int, dim: int, freq_dim: int = 256, scale: tuple[float, ...] | None = None):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"ControlMLP: freq_dim must be even, got {freq_dim}")
        self.num_fields, self.freq_dim = num_fields, freq_dim
        self.scale_values = tuple(scale or (1.0,) * num_fields)
        self.register_buffer("scale", torch.empty(num_fields), persistent=False)
        self.linear_1 = nn.Linear(num_fields * freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init (N(0, 0.02) first layer, zero output layer) and the computed `scale` buffer."""
        self.scale.copy_(torch.tensor(self.scale_values))
        nn.init.normal_(self.linear_1.weight, std=0.02)
        nn.init.zeros_(self.linear_1.bias)
        nn.init.zeros_(self.linear_2.weight)  # zero-initialised output (Table 2a "zero." init)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, values: Tensor) -> Tensor:
        if values.dim() != 2 or values.shape[1] != self.num_fields:
            raise ValueError(f"ControlMLP: expected metadata of shape (B, {self.num_fields}), got {tuple(values.shape)}")
        feats = sinusoidal_features(values * self.scale, self.freq_dim)  # (B, n * freq_dim)
        feats = feats.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(feats)))  # (B, dim)


class ControlEmbedder(nn.Module):
    """c_emb(phi_h, phi_l, t) (B, dim), added to the timestep embedding by every backbone.

    mode "additive": c_emb = E(cat(phi_h, phi_l)) (SDXL-style joint embedding, gamma = 1; `gamma` ignored).
    mode "disentangled": c_emb = E_h(phi_h) + gamma_c(t) * E_l(phi_l) (Eq. 1).
    Rows with `cond.control_keep == False` (or a cond without control) get c_emb = 0 exactly.
    t: (B,) DDPM timesteps in [0, num_timesteps); t_frac = t / num_timesteps.
    fields: the conditioned groups of `cond.CONTROL_GROUPS` (default all); the scalars of the other groups
    are multiplied by 0 before the sinusoidal features, so their values cannot reach the model.
    """

    def __init__(self, dim: int, mode: str = "disentangled", gamma: str = "power-cosine", alpha: float = 8.0,
                 k: float = 1.0, freq_dim: int = 256, num_timesteps: int = 1000,
                 fields: tuple[str, ...] = tuple(CONTROL_GROUPS)):
        super().__init__()
        if mode not in CONTROL_MODES[1:]:
            raise ValueError(f"ControlEmbedder: mode must be 'additive' or 'disentangled', got {mode!r}")
        if gamma not in GAMMA_KINDS:
            raise ValueError(f"ControlEmbedder: gamma must be one of {GAMMA_KINDS}, got {gamma!r}")
        self.mode, self.gamma, self.alpha, self.k = mode, gamma, float(alpha), float(k)
        self.num_timesteps = int(num_timesteps)
        self.fields = check_control_fields(fields, "ControlEmbedder: fields")
        nh, nl = len(CONTROL_H_FIELDS), len(CONTROL_L_FIELDS)
        h_scale = tuple(a * b for a, b in zip(_H_SCALE, field_mask(CONTROL_H_FIELDS, self.fields)))
        l_scale = tuple(a * b for a, b in zip(_L_SCALE, field_mask(CONTROL_L_FIELDS, self.fields)))
        if mode == "additive":
            self.embedder = ControlMLP(nh + nl, dim, freq_dim, h_scale + l_scale)
        else:
            self.embed_h = ControlMLP(nh, dim, freq_dim, h_scale)  # E_h
            self.embed_l = ControlMLP(nl, dim, freq_dim, l_scale)  # E_l
        if gamma == "step":
            self.register_buffer("sigmas", torch.empty(self.num_timesteps), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the embedders (zero output) and the computed buffers (also after `to_empty`)."""
        for m in self.modules():
            if isinstance(m, ControlMLP):
                m.reset_parameters()
        if self.gamma == "step":
            self.sigmas.copy_(pinned_sigmas(self.num_timesteps))

    def weight(self, t: Tensor) -> Tensor:
        """gamma_c(t) (B,) for DDPM timesteps t (B,)."""
        t_frac = t.float() / self.num_timesteps
        sigma = None
        if self.gamma == "step":
            idx = t.round().long().clamp(0, self.num_timesteps - 1)
            sigma = self.sigmas.to(t.device)[idx]
        return gamma_c(t_frac, self.gamma, self.alpha, self.k, sigma)

    def forward(self, t: Tensor, cond: Cond, batch_size: int) -> Tensor:
        ref = self._mlp().linear_2.weight
        dev, dtype = ref.device, ref.dtype
        if cond.control_h is None and cond.control_l is None:
            return torch.zeros(batch_size, ref.shape[0], device=dev, dtype=dtype)  # null control for all rows
        if cond.control_h is None or cond.control_l is None:
            raise ValueError("Cond: control_h (B, 6) and control_l (B, 2) must be given together (or neither = null control)")
        phi_h, phi_l = cond.control_h, cond.control_l  # (B, 6), (B, 2)
        if phi_h.shape[0] != batch_size or phi_l.shape[0] != batch_size:
            raise ValueError(f"Cond: control batch sizes {phi_h.shape[0]}/{phi_l.shape[0]} != x_t batch size {batch_size}")
        if self.mode == "additive":
            emb = self.embedder(torch.cat([phi_h, phi_l], dim=1))  # (B, dim)
        else:
            emb = self.embed_h(phi_h) + self.weight(t)[:, None].to(dtype) * self.embed_l(phi_l)  # Eq. 1, (B, dim)
        if cond.control_keep is not None:
            emb = emb * cond.control_keep.to(device=emb.device, dtype=emb.dtype)[:, None]  # null control rows -> 0
        return emb

    def _mlp(self) -> ControlMLP:
        return self.embedder if self.mode == "additive" else self.embed_h
