"""Pure-PyTorch reference of the fused ops: the executable specification.

Every native / Triton kernel in `condiff.ops` is tested against these functions (forward and gradients),
and these functions are gradcheck-tested in float64. They are written for clarity, not speed, and use
plain PyTorch autograd. Math is done in the input dtype except where noted (statistics in float32 for
half inputs, like `torch.nn.functional.layer_norm`).

Shapes: B batch, N image tokens, M context tokens, L = N + M, D model width, H heads, hd = D / H head
width, T text tokens, C text channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """adaLN modulation of DiT: `LayerNorm(x) * (1 + scale) + shift`, LayerNorm over D without affine.

    x (B, N, D); shift, scale (B, D) broadcast over the N tokens. Returns (B, N, D) in x's dtype.
    """
    y = F.layer_norm(x, x.shape[-1:], eps=eps)  # (B, N, D)
    return y * (1 + scale[:, None, :]) + shift[:, None, :]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gated residual of DiT / mmDiT blocks: `x + gate[:, None] * y`. x, y (B, N, D); gate (B, D)."""
    return x + gate[:, None, :] * y


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the dtype itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_heads(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim (hd) with a learnable weight (hd,); statistics in float32+."""
    tf = t.to(acc_dtype(t.dtype))
    r = torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)
    return (tf * r).to(t.dtype) * weight.to(t.dtype)


def qk_norm_join(
    qkv_x: torch.Tensor,
    qkv_c: torch.Tensor,
    q_norm_x: torch.Tensor,
    k_norm_x: torch.Tensor,
    q_norm_c: torch.Tensor,
    k_norm_c: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part of `joint_attention` that the kernels fuse: unpack, per-head RMSNorm of q and k, join.

    qkv_x (B, N, 3D), qkv_c (B, M, 3D) packed as [q | k | v], each D = H * hd head-major.
    Returns q, k, v (B, H, N + M, hd), image tokens first, then context tokens.
    """
    B, N, D3 = qkv_x.shape
    M = qkv_c.shape[1]
    D = D3 // 3
    hd = D // num_heads
    qx, kx, vx = qkv_x.view(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    qc, kc, vc = qkv_c.reshape(B, M, 3, num_heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, M, hd)
    qx, kx = rms_norm_heads(qx, q_norm_x, eps), rms_norm_heads(kx, k_norm_x, eps)
    qc, kc = rms_norm_heads(qc, q_norm_c, eps), rms_norm_heads(kc, k_norm_c, eps)
    q = torch.cat([qx, qc], dim=2)  # (B, H, L, hd)
    k = torch.cat([kx, kc], dim=2)
    v = torch.cat([vx, vc], dim=2)
    return q, k, v


def attend_and_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_x: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention over the joint sequence, then split into the two streams.

    q, k, v (B, H, L, hd) -> out_x (B, N, D), out_c (B, L - N, D) (views of one (B, L, D) tensor).
    """
    B, H, L, hd = q.shape
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
    o = o.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, D)
    return o[:, :n_x], o[:, n_x:]


def joint_attention(
    qkv_x: torch.Tensor,
    qkv_c: torch.Tensor,
    q_norm_x: torch.Tensor,
    k_norm_x: torch.Tensor,
    q_norm_c: torch.Tensor,
    k_norm_c: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmDiT joint attention with RMSNorm-QK (SD3): returns out_x (B, N, D), out_c (B, M, D).

    Each stream's q and k get a per-head RMSNorm with that stream's weights (hd,); the two sequences are
    joined [image tokens, context tokens] and attended by all heads (softmax(q k^T / sqrt(hd)) v).
    """
    q, k, v = qk_norm_join(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps)
    return attend_and_split(q, k, v, qkv_x.shape[1])


def replication_counts(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """m = ceil(T / length): the number of copies of a prompt needed to fill T positions (Eq. 7)."""
    return torch.div(T + lengths - 1, lengths, rounding_mode="floor")


def noisy_replicate_pad(emb: torch.Tensor, lengths: torch.Tensor, beta: float, noise: torch.Tensor) -> torch.Tensor:
    """Noisy replicate padding of text-encoder states (paper Sec. 2.1 and Eq. 7, App. C).

    emb (B, T, C): encoder states; lengths (B,) int: valid tokens per row (1 <= length <= T);
    noise (B, T, C): standard Gaussian draws eps_txt (drawn by the caller so every backend sees the same).

    out[b, t] = emb[b, t mod len_b]                                                  (replicate padding)
              + [t >= len_b] * beta * sqrt(m_b - 1) * sigma_ch[b] * noise[b, t]      (Eq. 7)
    with m_b = ceil(T / len_b) the replications needed, and sigma_ch[b] (C,) the per-channel standard
    deviation of row b's valid tokens (population std, i.e. divided by len_b; 0 for a 1-token prompt).

    Which tokens get noise: only the replicated (padding) positions. The prompt's own tokens are the real
    encoding and stay untouched, so beta = 0 is plain replicate padding and a full-length row
    (m = 1, no padding) is returned unchanged. Gradients flow to the valid tokens through both the copies
    and sigma_ch (the noise is a constant).
    """
    B, T, C = emb.shape
    lengths = lengths.to(device=emb.device, dtype=torch.long)
    t = torch.arange(T, device=emb.device)
    src = t[None, :] % lengths[:, None]  # (B, T) source token of every position
    out = torch.gather(emb, 1, src[:, :, None].expand(B, T, C))  # (B, T, C)
    acc = acc_dtype(emb.dtype)
    valid = (t[None, :] < lengths[:, None]).to(acc)  # (B, T)
    ef = emb.to(acc)
    mean = (ef * valid[:, :, None]).sum(1) / lengths[:, None]  # (B, C)
    var = (((ef - mean[:, None]) ** 2) * valid[:, :, None]).sum(1) / lengths[:, None]  # (B, C)
    # sqrt with a zero-safe gradient (a 1-token prompt has var = 0 exactly).
    pos = var > 0
    sigma = torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))), torch.zeros_like(var))
    m = replication_counts(lengths, T)
    amp = beta * torch.sqrt((m - 1).to(acc))  # (B,)
    pad = 1.0 - valid  # (B, T)
    noise_term = (amp[:, None, None] * pad[:, :, None]) * sigma[:, None, :] * noise.to(acc)  # (B, T, C)
    return (out.to(acc) + noise_term).to(emb.dtype)


__all__ = [
    "adaln_modulate",
    "gated_residual",
    "acc_dtype",
    "rms_norm_heads",
    "qk_norm_join",
    "attend_and_split",
    "joint_attention",
    "replication_counts",
    "noisy_replicate_pad",
]
