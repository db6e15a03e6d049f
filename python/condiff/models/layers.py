"""Building blocks shared by the transformer backbones (DiT, Att-DiT, mDT-v2, PixArt-alpha, mmDiT); their
scaffolding (config, patchify, positions, unpatchify) is `condiff.models.transformer`.

Parameter names follow facebookresearch/DiT (x_embedder.proj, t_embedder.mlp.{0,2}, y_embedder.embedding_table,
attn.qkv, attn.proj, mlp.fc1/fc2, adaLN_modulation.1, final_layer.*) so checkpoint conversion is a rename.

Attention implementation switch. Every attention of these models goes through `attention()` /
`joint_attention()` below, which use `F.scaled_dot_product_attention` (impl "sdpa", default) or an explicit
softmax(q k^T / sqrt(d)) v written with matmuls (impl "math"), which `torch.utils.flop_counter` counts on
any device (Table A1 counts the attention matmuls). Select it per model (`attn_impl` config field) or for
every model that leaves it at None with the context manager `attention_impl("math")`.

Fused ops. adaLN modulation, gated residuals and the mmDiT joint attention call `condiff.ops` with the
model's `ops_backend` (None = automatic, "reference" = the pure-PyTorch spec, for debugging). Meta tensors
(shape-only passes) always use the reference backend. Under impl "math" the joint attention is computed
here with explicit matmuls (same math as `condiff.ops.reference.joint_attention`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff import ops
from condiff.ops.reference import qk_norm_join

ATTN_IMPLS = ("sdpa", "math")
_attn_impl_default = "sdpa"


@contextlib.contextmanager
def attention_impl(impl: str):
    """Set the attention implementation of every model whose `attn_impl` is None, e.g. for FLOP counting."""
    global _attn_impl_default
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention_impl: impl must be one of {ATTN_IMPLS}, got {impl!r}")
    previous, _attn_impl_default = _attn_impl_default, impl
    try:
        yield
    finally:
        _attn_impl_default = previous


def resolve_attn_impl(impl: str | None) -> str:
    return _attn_impl_default if impl is None else impl


def _backend(x: Tensor, backend: str | None) -> str | None:
    return "reference" if x.is_meta else backend


def attention(q: Tensor, k: Tensor, v: Tensor, impl: str = "sdpa", bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v. q (B, H, Lq, hd), k, v (B, H, Lk, hd); bias broadcastable to
    (B, H, Lq, Lk) or None -> (B, H, Lq, hd)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v  # (B, H, Lq, hd)


def joint_attention(qkv_x: Tensor, qkv_c: Tensor | None, num_heads: int, norms: tuple[Tensor, ...] | None = None, *,
                    impl: str = "sdpa", backend: str | None = None, bias: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """Attention over the joined sequence [image tokens, context tokens], each stream with its own q, k, v.

    qkv_x (B, N, 3D), qkv_c (B, M, 3D) or None, packed [q | k | v], head-major. norms: None (no qk-norm)
    or the RMSNorm weights (q_x, k_x, q_c, k_c), each (hd,), eps 1e-6 (SD3 / the paper's mmDiT).
    bias: additive attention bias over the joined sequence (mDT's relative positions), or None.
    Returns out_x (B, N, D) and out_c (B, M, D) (None when qkv_c is None), before the output projection.
    """
    B, N, D3 = qkv_x.shape
    if qkv_c is None:
        qkv_c = qkv_x.new_zeros(B, 0, D3)
    if norms is not None and impl == "sdpa" and bias is None:
        out_x, out_c = ops.joint_attention(qkv_x, qkv_c, *norms, num_heads, 1e-6, backend=_backend(qkv_x, backend))
    else:
        if norms is not None:
            q, k, v = qk_norm_join(qkv_x, qkv_c, *norms, num_heads, 1e-6)  # each (B, H, N + M, hd)
        else:
            qkv = torch.cat([qkv_x, qkv_c], dim=1) if qkv_c.shape[1] else qkv_x  # (B, L, 3D)
            q, k, v = qkv.reshape(B, qkv.shape[1], 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        o = attention(q, k, v, impl, bias).transpose(1, 2).reshape(B, q.shape[2], D3 // 3)  # (B, L, D)
        out_x, out_c = o[:, :N], o[:, N:]
    return out_x, (out_c if out_c.shape[1] else None)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, backend: str | None = None) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift (no affine, eps 1e-6). x (B, N, D); shift, scale (B, D)."""
    return ops.adaln_modulate(x, shift, scale, 1e-6, backend=_backend(x, backend))


def gated(x: Tensor, gate: Tensor, y: Tensor, backend: str | None = None) -> Tensor:
    """x + gate[:, None] * y. x, y (B, N, D); gate (B, D)."""
    return ops.gated_residual(x, gate, y, backend=_backend(x, backend))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> Tensor:
    """DiT / diffusers (flip_sin_to_cos) sinusoidal features: t (B,) -> (B, dim) = [cos, sin].
    shift: diffusers' `downscale_freq_shift` (frequencies max_period^(-i / (dim/2 - shift)); 0 = DiT, SD3, PixArt;
    1 = diffusers' DiTTransformer2DModel, needed to convert it exactly)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """t (B,) float DDPM timesteps -> (B, dim): 256 sinusoidal features -> Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, shift=self.freq_shift).to(self.mlp[0].weight.dtype))  # (B, dim)


class VectorEmbedder(nn.Module):
    """A vector (B, in_dim) -> Linear -> SiLU -> Linear -> (B, dim): SD3's pooled-text projection (linear_1/2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, v: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(v)))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) tokens, N = (H/p)(W/p), row-major; a p x p stride-p convolution (timm / DiT)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))  # DiT: init like nn.Linear
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p or C != self.proj.in_channels:
            raise ValueError(f"PatchEmbed: input must be (B, {self.proj.in_channels}, H, W) with H, W multiples of "
                             f"the patch size {p}, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2).contiguous(), (H // p, W // p)  # (B, N, D), grid


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm Mlp as used by DiT / PixArt / SD3's FeedForward)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Self-attention over the image tokens, optionally joined by a context stream (tokens with own q, k, v).

    context: None (plain self-attention, DiT); "light" (context tokens get their own q,k,v `context_qkv`
    and share the output projection `proj`); "full" (SD3 dual stream: own q,k,v and own `context_proj`).
    qk_norm: per-head RMSNorm of q and k (eps 1e-6, learnable weight (hd,)) for each stream (SD3 / mmDiT).
    context_pre_only: the context stream's outputs are not needed after this block (SD3's last block): its
    output projection is skipped (and `context_proj` not created).
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = False, context: str | None = None,
                 context_pre_only: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.context, self.context_pre_only = num_heads, context, context_pre_only
        hd = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else None
        if context is not None:
            self.context_qkv = nn.Linear(dim, 3 * dim)
            # a pre-only context's queries are discarded: no q norm (SD3's last-block norm_added_q has no effect)
            self.context_q_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm and not context_pre_only else None
            self.context_k_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else None
            if context == "full" and not context_pre_only:
                self.context_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, c: Tensor | None = None, *, impl: str = "sdpa", backend: str | None = None,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), c (B, M, D) (only with a context stream), bias (B|1, H, L, L) | None
        -> projected (out_x (B, N, D), out_c (B, M, D) | None)."""
        qkv_c = self.context_qkv(c) if (c is not None and self.context is not None) else None  # (B, M, 3D)
        norms = None
        if self.q_norm is not None:
            ck = self.context_k_norm if qkv_c is not None else self.k_norm
            cq = (self.context_q_norm or ck) if qkv_c is not None else self.q_norm  # (ck: placeholder, see init)
            norms = (self.q_norm.weight, self.k_norm.weight, cq.weight, ck.weight)
        out_x, out_c = joint_attention(self.qkv(x), qkv_c, self.num_heads, norms, impl=impl, backend=backend,
                                       bias=bias)
        if out_c is None or self.context_pre_only:
            return self.proj(out_x), None
        return self.proj(out_x), (self.context_proj if self.context == "full" else self.proj)(out_c)


class CrossAttention(nn.Module):
    """Image tokens attend to context tokens (PixArt's MultiHeadCrossAttention: q_linear, kv_linear, proj)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, *, impl: str = "sdpa") -> Tensor:
        """x (B, N, D), y (B, M, Dc) -> (B, N, D)."""
        B, N, D = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, M, hd)
        return self.proj(attention(q, k, v, impl).transpose(1, 2).reshape(B, N, D))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) -> Linear to p*p*C_out per token; both zero-initialised (DiT)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for lin in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor, backend: str | None = None) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(x, shift, scale, backend))  # (B, N, p*p*C_out)


def xavier_init_linears(module: nn.Module) -> None:
    """DiT's basic init: xavier-uniform weights, zero biases for every nn.Linear (specific inits follow)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
