"""Text padding modes (paper Sec. 2.1 "Improved text conditioning", App. C Eq. 7, Table 3).

A text encoder returns T states per prompt (T = 77 for CLIP) of which only `length` are the prompt
(BOS and EOS included); the rest are padding. The denoiser attends to all T, so what the padding
positions contain matters:
  zero             padding positions are set to 0 (the baseline of Table 3).
  replicate        padding position t takes a copy of prompt token t mod length.
  noisy-replicate  replicate + Gaussian noise beta * sqrt(m - 1) * sigma_ch * eps on the copies (Eq. 7),
                   m = ceil(T / length), sigma_ch the per-channel std of the prompt's tokens.
The models call `pad_text` with `beta = text_noise_beta` in training mode and `beta = 0` in eval mode:
the noise is a training-time regulariser (a data augmentation of the conditioning); at sampling time
noisy-replicate is plain replicate, so sampling is deterministic given the prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from condiff import ops

PADDING_MODES = ("zero", "replicate", "noisy-replicate")


def pad_text(states: Tensor, lengths: Tensor, mode: str = "zero", beta: float = 0.0,
             generator: torch.Generator | None = None, *, backend: str | None = None) -> Tensor:
    """Apply a padding mode to text-encoder states.

    states (B, T, C); lengths (B,) int, 1 <= length <= T (valid tokens per row). Returns (B, T, C).
    `beta` is only used by "noisy-replicate" (beta = 0 makes it plain replicate). `backend` picks the
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
