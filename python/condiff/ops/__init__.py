"""Fused ops of condiff: the public API (contract in docs/ARCHITECTURE.md).

    adaln_modulate(x, shift, scale, eps=1e-6, *, backend=None)   LayerNorm(x) * (1 + scale) + shift
    gated_residual(x, gate, y, *, backend=None)                  x + gate[:, None] * y
    joint_attention(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps=1e-6, *, backend=None)
    noisy_replicate_pad(emb, lengths, beta, generator=None, *, backend=None)      paper Eq. 7
    backends()                                                   which backends are live here, and why not

Backends: "reference" (pure PyTorch, `reference.py`, the executable spec), "cpu" (C++/OpenMP kernels of
the native extension), "cuda" (CUDA kernels of the native extension, compiled where nvcc was found),
"triton" (Triton kernels on a GPU, or in Triton's CPU interpreter under TRITON_INTERPRET=1).
`backend=None` picks automatically: CUDA tensors -> "cuda", else "triton", else "reference";
CPU tensors -> "cpu" if the native extension is loaded, else "reference"; an automatically picked
kernel is first checked against the reference on its device (selftest.py) and replaced by the
reference, with a warning, if it disagrees. Every kernel backend is a
torch.library custom op with a registered backward (library.py), so autograd and `torch.compile`
(fullgraph) work with every backend.

Mixed dtypes: the modulation / gate tensors are cast to the activation's dtype (x, resp. qkv_x), so the
output has the activation's dtype; norm weights may be any float dtype (kernels use them in the
accumulation dtype).
Every kernel accumulates in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

from condiff.ops import _native, library, reference, selftest

BACKENDS = ("reference", "cpu", "cuda", "triton")


@lru_cache(maxsize=None)
def _triton_state() -> tuple[bool, str]:
    try:
        import triton
    except Exception as exc:  # not installed, or broken install
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
    return False, f"triton {triton.__version__} installed but no CUDA device (TRITON_INTERPRET=1 runs its CPU interpreter)"


def backends() -> dict[str, dict]:
    """Which backends are live: {name: {"live": bool, "reason": str}} (+ "build" for the native ones)."""
    cpu_live = _native.LOADED
    cuda_built = _native.cuda_compiled()
    build = " ".join(f"{k}={v}" for k, v in _native.BUILD_INFO.items())
    if not cpu_live:
        cpu_reason = cuda_reason = _native.REASON
    else:
        cpu_reason = f"native extension {_native.LIB_PATH.name} ({build})"
        if not cuda_built:
            cuda_reason = "native extension built without CUDA kernels (no nvcc / CUDA_HOME, or CONDIFF_CUDA=0)"
        elif not torch.cuda.is_available():
            cuda_reason = f"CUDA kernels compiled in (nvcc {_native.BUILD_INFO.get('nvcc')}, archs {_native.BUILD_INFO.get('archs')}) but no CUDA device"
        else:
            cuda_reason = f"CUDA kernels on {torch.cuda.get_device_name()}"
    triton_live, triton_reason = _triton_state()
    return {
        "reference": {"live": True, "reason": "pure PyTorch (condiff/ops/reference.py)"},
        "cpu": {"live": cpu_live, "reason": cpu_reason},
        "cuda": {"live": cpu_live and cuda_built and torch.cuda.is_available(), "reason": cuda_reason,
                 "compiled": cuda_built},
        "triton": {"live": triton_live, "reason": triton_reason},
    }


def _select(backend: str | None, t: Tensor) -> str:
    """Resolve `backend` for a tensor on t's device; errors name the backend and why it is unavailable."""
    if backend is None:
        if t.is_cuda:
            if _native.cuda_compiled():
                return "cuda"
            return "triton" if _triton_state()[0] else "reference"
        return "cpu" if (_native.LOADED and t.device.type == "cpu") else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "cpu":
        live = _native.LOADED
    elif backend == "cuda":
        live = _native.cuda_compiled() and (t.is_cuda or torch.cuda.is_available())
    else:
        live = _triton_state()[0]
    if not live:  # (backends() builds every reason: only on this error path, it is not free)
        raise RuntimeError(f"backend={backend!r} is not available: {backends()[backend]['reason']}")
    if backend == "cpu" and t.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got a tensor on {t.device}")
    if backend == "cuda" and not t.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got a tensor on {t.device}")
    if backend == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {t.device}")
    return backend


def _route(op: str, backend: str | None, t: Tensor) -> str:
    """`_select`, then: an automatically chosen kernel that fails its self-test on t's device (run
    once per op, backend and device in a process; selftest.py) is replaced by the reference."""
    b = _select(backend, t)
    if backend is None and b != "reference" and not selftest.passed(op, b, t.device):
        return "reference"
    return b


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """Fused adaLN modulation of DiT: `LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`.

    LayerNorm over the last dim, without affine. x (B, N, D); shift, scale (B, D) -> (B, N, D), x's dtype.
    Kernels: one pass per row forward (statistics + modulation), one backward kernel producing
    grad_x and the per-batch reductions grad_shift / grad_scale (statistics recomputed, not stored).
    """
    _check(x.dim() == 3, f"adaln_modulate: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, _, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        _check(tuple(t.shape) == (B, D), f"adaln_modulate: {name} must be (B, D) = ({B}, {D}), got {tuple(t.shape)}")
    shift, scale = shift.to(x.dtype), scale.to(x.dtype)
    b = _route("adaln_modulate", backend, x)
    if b == "reference":
        return reference.adaln_modulate(x, shift, scale, eps)
    return library.adaln_modulate(x.contiguous(), shift.contiguous(), scale.contiguous(), float(eps), b)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, *, backend: str | None = None) -> Tensor:
    """Gated residual of DiT / mmDiT blocks: `x + gate[:, None] * y`. x, y (B, N, D); gate (B, D).

    Fused into one read of x and y and one write (eager: a temporary for gate * y); the backward kernel
    produces grad_y and the reduction grad_gate in one pass (grad_x is the incoming gradient itself).
    """
    _check(x.dim() == 3 and tuple(y.shape) == tuple(x.shape),
           f"gated_residual: x and y must both be (B, N, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    B, _, D = x.shape
    _check(tuple(gate.shape) == (B, D), f"gated_residual: gate must be (B, D) = ({B}, {D}), got {tuple(gate.shape)}")
    gate, y = gate.to(x.dtype), y.to(x.dtype)
    b = _route("gated_residual", backend, x)
    if b == "reference":
        return reference.gated_residual(x, gate, y)
    return library.gated_residual(x.contiguous(), gate.contiguous(), y.contiguous(), b)


def joint_attention(qkv_x: Tensor, qkv_c: Tensor, q_norm_x: Tensor, k_norm_x: Tensor, q_norm_c: Tensor,
                    k_norm_c: Tensor, num_heads: int, eps: float = 1e-6, *,
                    backend: str | None = None) -> tuple[Tensor, Tensor]:
    """mmDiT (SD3) joint attention with RMSNorm-QK: returns out_x (B, N, D), out_c (B, M, D).

    qkv_x (B, N, 3D) image stream, qkv_c (B, M, 3D) context stream (M may be 0), both packed [q | k | v]
    with D = num_heads * hd head-major; q_norm_* / k_norm_* (hd,) per-head RMSNorm weights of each stream.

    What is fused, honestly: one kernel unpacks both qkv streams, applies the per-head RMSNorm (eps) to q
    and k with the stream's weights and writes the joined (B, H, N + M, hd) q / k / v (and one backward
    kernel does the reverse, including the weight gradients). The attention core itself is
    `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, 1/sqrt(hd) scale, no mask),
    and the two outputs are views of one (B, N + M, D) tensor.
    """
    _check(qkv_x.dim() == 3 and qkv_c.dim() == 3,
           f"joint_attention: qkv_x and qkv_c must be (B, N, 3D) and (B, M, 3D), got {tuple(qkv_x.shape)} and {tuple(qkv_c.shape)}")
    B, N, D3 = qkv_x.shape
    _check(qkv_c.shape[0] == B and qkv_c.shape[2] == D3,
           f"joint_attention: qkv_c must be (B={B}, M, 3D={D3}), got {tuple(qkv_c.shape)}")
    _check(num_heads > 0 and D3 % (3 * num_heads) == 0,
           f"joint_attention: qkv last dim {D3} must be 3 * num_heads({num_heads}) * head_dim")
    hd = D3 // 3 // num_heads
    for name, w in (("q_norm_x", q_norm_x), ("k_norm_x", k_norm_x), ("q_norm_c", q_norm_c), ("k_norm_c", k_norm_c)):
        _check(tuple(w.shape) == (hd,), f"joint_attention: {name} must be (head_dim,) = ({hd},), got {tuple(w.shape)}")
    qkv_c = qkv_c.to(qkv_x.dtype)
    b = _route("joint_attention", backend, qkv_x)
    if b == "reference":
        return reference.joint_attention(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps)
    q, k, v = library.qk_norm_join(qkv_x.contiguous(), qkv_c.contiguous(), q_norm_x, k_norm_x, q_norm_c, k_norm_c,
                                   int(num_heads), float(eps), b)
    return reference.attend_and_split(q, k, v, N)


def _check_lengths(lengths: Tensor, T: int) -> None:
    """ValueError naming the first row whose length is outside [1, T] (one device sync for GPU lengths)."""
    bad = ((lengths < 1) | (lengths > T)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"lengths[{i}] = {int(lengths[i])}: every row needs 1 <= length <= T = {T} valid tokens")


def noisy_replicate_pad(emb: Tensor, lengths: Tensor, beta: float, generator: torch.Generator | None = None, *,
                        backend: str | None = None) -> Tensor:
    """Noisy replicate padding of text-encoder states (paper Eq. 7): see `reference.noisy_replicate_pad`.

    emb (B, T, C); lengths (B,) ints in [1, T] (a sequence or tensor); beta >= 0 the noise scale beta_txt.
    Positions t >= length take cyclic copies of the row's prompt tokens, plus
    beta * sqrt(m - 1) * sigma_ch * eps with m = ceil(T / length) and sigma_ch the per-channel std of the
    prompt tokens. Only padding positions get noise; beta = 0 is plain replicate padding; a full-length
    row is returned unchanged; a length outside [1, T] raises ValueError naming `lengths` and the row.
    That check runs on the host, outside torch.compile only (lengths on a GPU cost one device sync there;
    pass them as a sequence or CPU tensor to avoid it); under torch.compile and CUDA-graph capture the
    kernels check on the device (CUDA, Triton: device-side assert, and clamp to [1, T]).

    The Gaussian draws eps (B, T, C) are made here with `torch.randn(generator=generator)` (always, so
    the generator advances identically whatever beta is) and handed to every backend, which makes all
    backends exactly comparable. Under torch.compile pass generator=None.
    """
    _check(emb.dim() == 3, f"noisy_replicate_pad: emb must be (B, T, C), got shape {tuple(emb.shape)}")
    _check(float(beta) >= 0, f"noisy_replicate_pad: beta must be >= 0, got {beta}")
    B, T, _ = emb.shape
    lengths = torch.as_tensor(lengths, dtype=torch.long)  # a sequence stays on the host for the check below
    _check(tuple(lengths.shape) == (B,), f"noisy_replicate_pad: lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
    if not torch.compiler.is_compiling():
        _check_lengths(lengths, T)
    lengths = lengths.to(emb.device)
    gen_device = generator.device if generator is not None else emb.device
    noise = torch.randn(emb.shape, generator=generator, dtype=emb.dtype, device=gen_device).to(emb.device)
    b = _route("noisy_replicate_pad", backend, emb)
    if b == "reference":
        return reference.noisy_replicate_pad(emb, lengths, float(beta), noise)
    return library.noisy_replicate_pad(emb.contiguous(), lengths.contiguous(), float(beta), noise, b)


__all__ = ["adaln_modulate", "gated_residual", "joint_attention", "noisy_replicate_pad", "backends", "BACKENDS"]
