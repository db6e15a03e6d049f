"""The DDPM noise schedule seen through EDM's sigma view (paper App. C, Eq. 6) and its Eq. 3 rescaling.

One `Schedule` object is built from a handful of JSON-able numbers, stored in every checkpoint
(`to_dict()` / `from_dict()`), and used identically by the training loss and by every sampler, so
sampling always uses exactly the schedule (and the resolution rescaling) that training used.

Conventions (all tables are float64 on the CPU; index = integer DDPM timestep t in [0, T), T = 1000):
  betas           (T,)  quadratic ("scaled linear"): linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2
  alphas_cumprod  (T,)  abar_t = prod_{i<=t} (1 - beta_i); t = 0 is the least noisy level
  sigmas          (T,)  EDM noise level sigma_t = sqrt((1 - abar_t) / abar_t) (1/sqrt(SNR_t))
  Eq. 5 (alpha view)  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  Eq. 6 (sigma view)  x_t = (x_0 + sigma_t eps) / sqrt(1 + sigma_t^2)  -- the same numbers, since
                      1 / sqrt(1 + sigma^2) = sqrt(abar) and sigma / sqrt(1 + sigma^2) = sqrt(1 - abar).

Order of the optional transforms (each documented at its option):
  base betas -> zero-terminal-SNR rescale (Lin et al. 2024) -> Eq. 3 resolution rescale
  -> terminal clamp abar_{T-1} >= 2^-24 (only reachable with zero terminal SNR).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

BETA_SCHEDULES = ("scaled_linear", "linear")
WEIGHTINGS = ("edm", "eps-inv-snr", "min-snr-gamma")
# names that are no longer accepted, with what to write instead (a config must not change meaning silently)
_RENAMED_WEIGHTINGS = {
    "inv-snr": "'edm' (App. C's 1/sigma_t^2 on the denoiser error = plain epsilon MSE, the default) or "
               "'eps-inv-snr' (1/sigma_t^2 on the epsilon MSE, the former default)",
    "none": "'edm' (plain epsilon MSE)",
}
TERMINAL_ALPHA_CUMPROD = 2.0**-24
"""Floor of abar at the last timestep. With zero terminal SNR abar_{T-1} = 0, sigma = inf and the epsilon
parametrisation cannot recover x_0 (x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)); diffusers' Euler and
DPM-Solver schedulers use the same 2^-24 floor (sigma_max = 4096). Below the floor the clamp is a no-op."""


def scaled_linear_betas(beta_start: float, beta_end: float, num_timesteps: int) -> Tensor:
    """Quadratic DDPM betas (T,) float64: linspace(sqrt(b0), sqrt(b1), T) ** 2 (LDM / SD "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(abar) so that abar_{T-1} = 0 and abar_0 is unchanged."""
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * (a0 / (a0 - aT))
    return a**2


def rescale_for_resolution(alphas_cumprod: Tensor, s: float, s_new: float) -> Tensor:
    """Eq. 3: abar' = s^2 abar / (s'^2 + abar (s^2 - s'^2)) for a resolution change s -> s'.

    Equivalent to sigma'_t = (s'/s) sigma_t (App. D, Eq. 21-23): going up in resolution multiplies every
    noise level by the upscale factor so that a low-resolution patch keeps the same uncertainty.
    Only the ratio s'/s matters (pixels or latent cells alike). Identity at s == s'.
    """
    s2, n2 = float(s) ** 2, float(s_new) ** 2
    return s2 * alphas_cumprod / (n2 + alphas_cumprod * (s2 - n2))


@dataclass(frozen=True)
class ScheduleConfig:
    """The JSON-able numbers that define a `Schedule` (what `to_dict()` stores in a checkpoint).

    beta_schedule: "scaled_linear" (the paper's quadratic betas) or "linear" (DDPM / DiT / PixArt, for
    converted checkpoints: 1e-4 .. 0.02).

    base_resolution / resolution: Eq. 3 rescaling from the resolution the betas were designed for
    (s, e.g. 256 for the paper's pre-training) to the resolution the model is trained and sampled at
    (s', e.g. 512 when fine-tuning). Both None (or equal) = no rescaling.
    """

    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    zero_terminal_snr: bool = False
    base_resolution: float | None = None
    resolution: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.num_timesteps, int) and self.num_timesteps >= 2):
            raise ValueError(f"Schedule: num_timesteps must be an int >= 2, got {self.num_timesteps!r}")
        if not (0.0 < self.beta_start < self.beta_end < 1.0):
            raise ValueError(f"Schedule: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"Schedule: beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if (self.base_resolution is None) != (self.resolution is None):
            raise ValueError("Schedule: give both base_resolution and resolution (Eq. 3 rescaling) or neither, "
                             f"got base_resolution={self.base_resolution}, resolution={self.resolution}")
        for name in ("base_resolution", "resolution"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Schedule: {name} must be > 0, got {value!r}")


class Schedule:
    """DDPM schedule with the EDM sigma view, epsilon prediction and the paper's loss weighting.

    Build with keyword arguments (see `ScheduleConfig`): `Schedule()` is the paper's schedule
    (quadratic, 0.00085 .. 0.012, T = 1000). Tables are float64 CPU tensors; `add_noise` casts the
    per-sample coefficients to the data's dtype/device.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.config = ScheduleConfig(**kwargs)
        c = self.config
        if c.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(c.beta_start, c.beta_end, c.num_timesteps)
        else:
            betas = torch.linspace(c.beta_start, c.beta_end, c.num_timesteps, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        if c.zero_terminal_snr:
            abar = zero_terminal_snr(abar)
        if c.base_resolution is not None and c.base_resolution != c.resolution:
            abar = rescale_for_resolution(abar, c.base_resolution, c.resolution)
        abar = abar.clamp(min=TERMINAL_ALPHA_CUMPROD)
        self.alphas_cumprod = abar  # (T,) float64
        # betas consistent with the final abar (after the optional transforms): abar_t / abar_{t-1} = 1 - beta_t
        self.betas = 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # (T,)
        self.sigmas = ((1.0 - abar) / abar).sqrt()  # (T,) EDM sigma_t
        # Eq. 6 coefficients: x_t = c_x0 * x_0 + c_eps * eps
        self._c_x0 = 1.0 / (1.0 + self.sigmas**2).sqrt()  # (T,) = sqrt(abar)
        self._c_eps = self.sigmas / (1.0 + self.sigmas**2).sqrt()  # (T,) = sqrt(1 - abar)
        self._weight_tables: dict[tuple[str, float], Tensor] = {}

    # ---------------------------------------------------------------- construction / persistence
    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, stored in checkpoints (meta.json "schedule"); `from_dict` rebuilds it exactly."""
        return {"type": "ddpm-eps", **asdict(self.config)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        if not isinstance(d, dict):
            raise ValueError(f"Schedule.from_dict: expected a dict, got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("type", "ddpm-eps")
        if kind != "ddpm-eps":
            raise ValueError(f"Schedule.from_dict: unknown schedule type {kind!r} (expected 'ddpm-eps')")
        known = {f.name for f in fields(ScheduleConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Schedule.from_dict: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def at_resolution(self, resolution: float, base_resolution: float | None = None) -> "Schedule":
        """The same schedule rescaled (Eq. 3) for use at `resolution`.

        base_resolution: the resolution the schedule is used at NOW (e.g. the source run's 256 px). A
        schedule without a stored rescaling takes it as the Eq. 3 base s (None: `resolution`, identity).
        A schedule already rescaled (base s0 -> s1) keeps its base s0, so rescaling never compounds
        (256 -> 512 -> 1024 == 256 -> 1024); a given base_resolution must then equal s1 (checked).
        """
        c = self.config
        if c.base_resolution is not None:
            if base_resolution is not None and float(base_resolution) != float(c.resolution):
                raise ValueError(f"Schedule.at_resolution: this schedule is already rescaled for resolution "
                                 f"{c.resolution} (base {c.base_resolution}), not {base_resolution}")
            base = c.base_resolution
        else:
            base = resolution if base_resolution is None else base_resolution
        return Schedule(**asdict(replace(c, base_resolution=float(base), resolution=float(resolution))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.config == other.config

    def __repr__(self) -> str:
        return f"Schedule({', '.join(f'{k}={v!r}' for k, v in asdict(self.config).items())})"

    # ---------------------------------------------------------------- noising (Eq. 6)
    @staticmethod
    def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """table[t] as (B, 1, ..., 1) in like's dtype/device. t (B,) integer timesteps."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("Schedule: timesteps must be integers in [0, T) for table lookups")
            t = t.long()
        values = table[t.cpu()].to(device=like.device, dtype=like.dtype)  # (B,)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Eq. 6: x_t = (x_0 + sigma_t eps) / sqrt(1 + sigma_t^2). x0, noise (B, ...); t (B,) int in [0, T)."""
        if x0.shape != noise.shape:
            raise ValueError(f"add_noise: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        self._check_t(t)
        return self._gather(self._c_x0, t, x0) * x0 + self._gather(self._c_eps, t, x0) * noise

    def _check_t(self, t: Tensor) -> None:
        t = torch.as_tensor(t)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"Schedule: timesteps must lie in [0, {self.num_timesteps}), "
                             f"got min {int(t.min())}, max {int(t.max())}")

    # ---------------------------------------------------------------- loss weighting (App. C)
    def weight_table(self, weighting: str = "edm", snr_gamma: float = 5.0) -> Tensor:
        """Per-timestep weight on the EPSILON MSE, (T,) float64, normalised to mean 1 over t in [0, T).

        "edm" (default; App. C read in EDM's terms): "the loss is weighted by the inverse SNR 1/sigma_t^2".
            In EDM the weight multiplies the denoiser error; with x0_hat = sqrt(1 + sigma^2) x_t - sigma eps_hat
            (Eq. 17), x0_hat - x0 = -sigma_t (eps_hat - eps), so 1/sigma_t^2 ||x0_hat - x0||^2 is exactly
            ||eps_hat - eps||^2: w_t = 1 on the epsilon MSE (also DDPM's "simple" loss).
        "eps-inv-snr": w_t = 1 / sigma_t^2 = abar_t / (1 - abar_t) applied to the epsilon MSE, i.e. the
            1/sigma^2 factor applied a second time (condiff's default before the EDM reading; the weights span
            ~2.5e5 over t and most of the mass sits on t < 100). Kept for comparisons, not the paper's objective.
        "min-snr-gamma" (Hang et al. 2023, epsilon parametrisation): w_t = min(SNR_t, gamma) / SNR_t,
            SNR_t = 1/sigma_t^2.
        Normalisation (our choice): every table is divided by its mean over the T timesteps, so that
        E_t[w_t] = 1 under uniform t and the loss keeps the scale of plain epsilon MSE; a learning rate
        tuned for one weighting does not need retuning for another (unnormalised, the eps-inv-snr mean
        over the paper's schedule is 6.71 and its maximum 1175 at t = 0).
        """
        key = (weighting, float(snr_gamma))
        if key in self._weight_tables:
            return self._weight_tables[key]
        snr = 1.0 / self.sigmas**2  # (T,)
        if weighting == "edm":
            w = torch.ones_like(snr)
        elif weighting == "eps-inv-snr":
            w = snr.clone()
        elif weighting == "min-snr-gamma":
            if not snr_gamma > 0:
                raise ValueError(f"min-snr-gamma weighting: snr_gamma must be > 0, got {snr_gamma!r}")
            w = snr.clamp(max=snr_gamma) / snr
        elif weighting in _RENAMED_WEIGHTINGS:
            raise ValueError(f"loss weighting {weighting!r} is no longer accepted: use {_RENAMED_WEIGHTINGS[weighting]}")
        else:
            raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self._weight_tables[key] = w / w.mean()
        return self._weight_tables[key]

    def loss_weight(self, t: Tensor, weighting: str = "edm", snr_gamma: float = 5.0) -> Tensor:
        """weight_table(...)[t] as a float32 (B,) tensor on t's device."""
        self._check_t(t)
        return self.weight_table(weighting, snr_gamma)[torch.as_tensor(t).long().cpu()].to(
            device=torch.as_tensor(t).device, dtype=torch.float32)

    # ---------------------------------------------------------------- helpers for samplers
    def alpha_bar(self, t: int) -> float:
        """abar_t as a Python float (t < 0 means the clean end: 1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[int(t)])

    def sigma(self, t: int) -> float:
        """EDM sigma_t as a Python float (t < 0: 0.0)."""
        return 0.0 if t < 0 else float(self.sigmas[int(t)])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])
