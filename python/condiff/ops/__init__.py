"""Fused ops of condiff (public API; contract in docs/ARCHITECTURE.md).

    adaln_modulate(x, shift, scale, eps=1e-6, *, backend=None)            # LayerNorm(x) * (1 + scale) + shift
    gated_residual(x, gate, y, *, backend=None)                           # x + gate[:, None] * y
    joint_attention(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps=1e-6, *, backend=None)
    noisy_replicate_pad(emb, lengths, beta, generator=None, *, backend=None)   # Eq. 7
    backends()                                                            # which backends are live, why not

`backend=None` chooses automatically; "reference" forces the pure-PyTorch spec in `reference.py`.
"""

from __future__ import annotations

import torch

from condiff.ops import reference

BACKENDS = ("reference", "cpu", "cuda", "triton")


def backends() -> dict:
    """{name: {"live": bool, "reason": str}} for reference / cpu / cuda / triton."""
    return {
        "reference": {"live": True, "reason": "pure PyTorch, always available"},
        "cpu": {"live": False, "reason": "native extension not built yet"},
        "cuda": {"live": False, "reason": "native extension not built yet"},
        "triton": {"live": False, "reason": "triton kernels not written yet"},
    }


def _check_backend(backend):
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def adaln_modulate(x, shift, scale, eps: float = 1e-6, *, backend: str | None = None):
    _check_backend(backend)
    return reference.adaln_modulate(x, shift, scale, eps)


def gated_residual(x, gate, y, *, backend: str | None = None):
    _check_backend(backend)
    return reference.gated_residual(x, gate, y)


def joint_attention(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads: int, eps: float = 1e-6, *,
                    backend: str | None = None):
    _check_backend(backend)
    return reference.joint_attention(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps)


def noisy_replicate_pad(emb, lengths, beta: float, generator: torch.Generator | None = None, *,
                        backend: str | None = None):
    _check_backend(backend)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    bad = (lengths < 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"lengths must be >= 1 (a prompt needs at least one token to replicate); row {bad[0]} has {int(lengths[bad[0]])}")
    noise = torch.randn(emb.shape, generator=generator, dtype=emb.dtype,
                        device=generator.device if generator is not None else emb.device).to(emb.device)
    return reference.noisy_replicate_pad(emb, lengths, beta, noise)


__all__ = ["adaln_modulate", "gated_residual", "joint_attention", "noisy_replicate_pad", "backends", "BACKENDS"]
