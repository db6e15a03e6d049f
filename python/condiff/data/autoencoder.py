"""Autoencoders between pixels in [-1, 1] and the diffusion model's latent space.

`build_autoencoder(config)`:
  {"kind": "pixels"}  identity (latent = image, 3 channels, downsample 1): pixel-space diffusion for
                      small data such as `shapes` on a CPU.
  {"kind": "diffusers", "path": DIR, "sample": False, "dtype": "float32"}
                      diffusers `AutoencoderKL` from a local directory (a VAE folder with config.json,
                      or a pipeline folder with a `vae/` sub-folder), e.g. SD's VAE. Latents are
                      `(z - shift_factor) * scaling_factor` with both factors read from the VAE's
                      config (shift 0 when absent, as for SD 1/2 and SDXL; SD3/FLUX VAEs have one);
                      z is the posterior mean (`sample=False`, deterministic, what we store when
                      precomputing) or a posterior sample (`sample=True`).
Both are frozen modules with `.encode(images) -> latents`, `.decode(latents) -> images`, `.config`
(JSON-able; rebuilds the same autoencoder), `.latent_channels` and `.downsample` (pixels per latent).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PixelAutoencoder(nn.Module):
    latent_channels, downsample = 3, 1

    def __init__(self):
        super().__init__()
        self.config = {"kind": "pixels"}

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images  # (B, 3, H, W)

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class DiffusersAutoencoder(nn.Module):
    """Frozen diffusers AutoencoderKL with its scaling (and shift) factor applied."""

    def __init__(self, vae, config: dict):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.config = dict(config)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sample = bool(config.get("sample", False))

    def train(self, mode: bool = True):  # frozen
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latents (B, C, H / downsample, W / downsample)."""
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents (B, C, h, w) -> images (B, 3, h * downsample, w * downsample), nominally [-1, 1]."""
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float()


def _vae_dir(path: str | None) -> str:
    hint = ("give autoencoder.path = a local diffusers AutoencoderKL directory (config.json + "
            "diffusion_pytorch_model.safetensors), e.g. a copy of stabilityai/sd-vae-ft-ema or the vae/ folder of a "
            "Stable Diffusion pipeline; nothing is downloaded. For pixel-space models use {'kind': 'pixels'}.")
    if not path:
        raise FileNotFoundError(f"autoencoder 'diffusers': no path given; {hint}")
    for cand in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise FileNotFoundError(f"autoencoder 'diffusers': no config.json in {path!r} or {os.path.join(path, 'vae')!r}; {hint}")


def build_autoencoder(config: dict | None = None) -> nn.Module:
    config = {"kind": "pixels"} if config is None else dict(config)
    kind = config.get("kind")
    if kind == "pixels":
        return PixelAutoencoder()
    if kind == "diffusers":
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("autoencoder 'diffusers' needs the package diffusers (pip install 'condiff[test]' or diffusers)") from None

        path = _vae_dir(config.get("path"))
        dtype = config.get("dtype", "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"autoencoder dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        try:
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=_DTYPES[dtype])
        except (OSError, EnvironmentError) as exn:
            raise FileNotFoundError(f"autoencoder 'diffusers': could not load weights from {path!r}: {exn}") from None
        return DiffusersAutoencoder(vae, {"kind": "diffusers", "path": config.get("path"), "sample": bool(config.get("sample", False)), "dtype": dtype})
    raise ValueError(f"autoencoder kind must be 'pixels' or 'diffusers', got {kind!r}")
