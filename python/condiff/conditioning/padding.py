"""Text padding modes (paper Sec. 2.1 "Improved text conditioning", App. C Eq. 7, Table 3).

A text encoder returns T states per prompt (T = 77 for CLIP) of which only `length` are the prompt
(BOS and EOS included); the rest are padding. The denoiser attends to all T, so what the padding
positions contain matters:
  zero             padding positions are set to 0 (the baseline of Table 3).
  replicate        padding position t takes a copy of prompt token t mod length.
  noisy-replicate  replicate + Gaussian noise beta * sqrt(m - 1) * sigma_ch * eps on the copies (Eq. 7),
                   m = ceil(T / length), sigma_ch the per-channel std of the prompt's tokens.
beta_txt (the models' `text_noise_beta`) is read in one of two ways (`text_noise_reading`):
  variance (default)  the paper's words: "additive Gaussian noise with a small variance beta_txt", so the
                      noise's std factor is sqrt(beta_txt);
  std                 beta_txt multiplies the std directly (condiff's reading before; Eq. 7 as printed).
Default "variance" because the paper defines beta_txt as a variance and gives no value for it, so the
wording is the only specification there is; "std" keeps runs trained with the former reading reproducible.
The models call `pad_text` with `beta = noise_amplitude(...)` in training mode and `beta = 0` in eval mode:
the noise is a training-time regulariser (a data augmentation of the conditioning); at sampling time
noisy-replicate is plain replicate, so sampling is deterministic given the prompt. `text_noise_at_inference`
keeps the noise at sampling time too (an ablation switch).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from condiff import ops

PADDING_MODES = ("zero", "replicate", "noisy-replicate")
NOISE_READINGS = ("variance", "std")


def noise_amplitude(beta_txt: float, reading: str = "variance", *, training: bool = True,
                    at_inference: bool = False) -> float:
    """The std factor that multiplies sqrt(m - 1) sigma_ch eps (Eq. 7): sqrt(beta_txt) ("variance") or
    beta_txt ("std"); 0 outside training unless `at_inference` (module docstring)."""
    if reading not in NOISE_READINGS:
        raise ValueError(f"text_noise_reading must be one of {NOISE_READINGS}, got {reading!r}")
    if beta_txt < 0:
        raise ValueError(f"text_noise_beta must be >= 0, got {beta_txt!r}")
    if not (training or at_inference):
        return 0.0
    return math.sqrt(beta_txt) if reading == "variance" else float(beta_txt)


def pad_text(states: Tensor, lengths: Tensor, mode: str = "zero", beta: float = 0.0,
             generator: torch.Generator | None = None, *, backend: str | None = None) -> Tensor:
    """Apply a padding mode to text-encoder states.

    states (B, T, C); lengths (B,) int, 1 <= length <= T (valid tokens per row). Returns (B, T, C).
    `beta` is only used by "noisy-replicate" (beta = 0 makes it plain replicate): the std factor of the noise
    (`noise_amplitude(beta_txt, reading)`, not beta_txt itself). `backend` picks the
    `condiff.ops.noisy_replicate_pad` implementation (None = automatic).
    """
    if states.dim() != 3:
        raise ValueError(f"pad_text: states must be (B, T, C), got shape {tuple(states.shape)}")
    if lengths is None:
        raise ValueError("pad_text: lengths (B,) is required (Cond.text_lengths)")
    if lengths.shape != (states.shape[0],):
        raise ValueError(f"pad_text: lengths must be ({states.shape[0]},), got {tuple(lengths.shape)}")
    if mode not in PADDING_MODES:
        raise ValueError(f"pad_text: mode must be one of {PADDING_MODES}, got {mode!r}")
    T = states.shape[1]
    lengths = lengths.to(states.device)
    if not states.is_meta and not torch.compiler.is_compiling() and bool((lengths > T).any()):  # no graph break
        raise ValueError(f"pad_text: lengths must be <= T = {T}, got max {int(lengths.max())}")
    if mode == "zero":
        valid = torch.arange(T, device=states.device)[None, :] < lengths[:, None]  # (B, T)
        return states * valid[:, :, None].to(states.dtype)
    if states.is_meta:  # shape-only pass (FLOP counting): padding is a gather (+ noise), no matmul
        return states.clone()
    if mode == "replicate":
        beta = 0.0
    return ops.noisy_replicate_pad(states, lengths, beta, generator, backend=backend)
